"""The engine: the BatchGenerator thread, sampling, text assembly, and the generate method."""
