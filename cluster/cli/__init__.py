"""The ``georeg`` command line (entry point ``cluster.cli.main:main``): one
module per command family (``node``, ``cluster`` for up/down/status/region,
``replication``, ``repository``, ``fault``, ``verify``, ``chaos``, ``bench``),
their shared plumbing in ``common``, the parser in ``main``."""
