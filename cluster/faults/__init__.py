"""Breaking the cluster on purpose and checking what is left: fault injection
(``controller``: outages, partitions, slow links, disks, destroyed regions,
paused nodes; any of them flapping on a seeded schedule, ``flap``),
scripted scenarios with a seed (``chaos``, shipped ones in ``scenarios/``),
and the convergence check ``georeg verify`` (``verify``)."""
