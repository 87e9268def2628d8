"""What the cluster is and how it runs: the Azure regions it knows
(``regions``), the validated spec (``spec``) and the concrete plan built from
it (``plan``), the supervisor of node processes (``supervisor``), the Python
API (``cluster.Cluster``), the management REST API that serves it
(``management``) and its client (``management_client``), and the files a
running cluster leaves in its data dir (``state``)."""
