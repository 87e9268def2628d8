"""One georeg registry node: the OCI HTTP API, encrypted storage and the event log."""
