"""Many georeg nodes as one registry: cluster spec, supervisor, routing, CLI."""
