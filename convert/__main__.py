"""`python -m convert to-flax|to-torch --src ... --dst ...`: see diffbody_jax/cli/convert.py."""

import sys

from diffbody_jax.cli.convert import main

sys.exit(main())
