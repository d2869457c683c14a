"""mlxd: a local LLM inference sidecar (namespace root for rpc, daemon, client, launchd)."""

__version__ = "0.1.0"
