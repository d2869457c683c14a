"""Models: loading and fingerprinting, the built-in models, GGUF import, and the BLAS."""
