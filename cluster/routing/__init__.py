"""How clients reach the cluster: where each request goes and what endpoints
carry at all (``policy``, no I/O), the streaming reverse proxy that moves its
bytes (``proxy``; each exchange's life as a state machine in ``lifecycle``,
HTTP message framing in ``stream``, kernel splicing in ``splice``, blob-download
hand-over to nodes in ``handoff``), active health checks (``probe``), and the
global and regional endpoints wired to a cluster (``endpoints``)."""
