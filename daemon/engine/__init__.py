"""The engine: the BatchGenerator thread, sampling, text assembly, and the loop bridge."""
