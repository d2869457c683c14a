"""`python -m mlxd.daemon ...` is the `mlxd` command (what the service files run)."""

import sys

from .cli import main

sys.exit(main())
