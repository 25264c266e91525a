"""`python -m train --config configs/<phase>.py[:args] --workdir DIR [--config.x=y ...]`: `diffbody train`."""

import sys

from diffbody_jax.cli.main import main

sys.exit(main(["train", *sys.argv[1:]]))
