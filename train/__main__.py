"""`python -m train --config configs/<phase>.py`: the training programs, thin over diffbody_jax.training.

No training phase has landed yet: the training engine (sharded train step, orbax checkpoints, resume)
and the phase configs come with their own issues. Until then this program says so and exits non-zero
instead of pretending to train.
"""

import sys

from diffbody_jax.cli.main import main

sys.exit(main(["train", *sys.argv[1:]]))
