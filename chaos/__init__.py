"""`make chaos` and `make soak`: the platform started as `make run` starts it (two replicas per service, supervised),
steady mixed traffic from bench.loadgen, one fault at a time, and a report per scenario (requests, failures by
status, recovery time, data lost, verdict). See RELIABILITY.md."""
