"""KV memory: the block pool, sessions, the prefix index, and session cache files."""
