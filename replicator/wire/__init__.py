"""Generated gRPC code for the replication contract in proto/ (see `make proto`)."""
