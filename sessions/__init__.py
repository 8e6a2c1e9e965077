"""Per-session lite queues and event logs in Redis, and the atomic scripts that move requests."""
