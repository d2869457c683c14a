"""The mlxd daemon; importing any part of it first loads a fast BLAS, before mlx.core."""

from mlxd.daemon.models.blas import load_blas

# At package import so every entry point (CLI, tests, bench) gets OpenBLAS before mlx.
BLAS: str = load_blas()
