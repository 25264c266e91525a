"""`python -m diffbody_jax ...`: the `diffbody` command."""

import sys

from diffbody_jax.cli.main import main

sys.exit(main())
