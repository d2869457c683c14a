"""The service: the daemon wired together, its method handlers, status, and its life."""
