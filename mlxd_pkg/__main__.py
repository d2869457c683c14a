"""`python -m mlxd ...` is the `mlxd` command."""

import sys

from .cli import main

sys.exit(main())
