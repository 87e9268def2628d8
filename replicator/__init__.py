"""The node's side of replication (subscriptions, transfer by digest, conflict
rules, zone quorum, residency, anti-entropy). Built on the node's event log."""
