"""The transport: the JSON-RPC server, socket listeners, activation, and the HTTP front."""
