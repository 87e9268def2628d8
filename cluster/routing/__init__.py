"""How clients reach the cluster: where each request goes (``policy``, no I/O),
the streaming reverse proxy that moves its bytes (``proxy``, with kernel
splicing in ``splice`` and blob-download hand-over to nodes in ``handoff``),
and the global and regional endpoints wired to a cluster (``endpoints``)."""
