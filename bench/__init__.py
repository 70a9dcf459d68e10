"""logbroker's benchmark harness: workloads as TOML files, one driver per system, honest medians.

Run `python -m bench --help`. Systems: logbroker (its own client), NATS JetStream (nats-py), Redis
Streams (redis-py + hiredis) and Redis's own C client `redis-benchmark` as a native reference.
"""
