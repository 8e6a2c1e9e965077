"""The HTTP API: stateless, any number of processes; all state lives in Redis."""
