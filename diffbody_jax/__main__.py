"""`python -m diffbody_jax ...`: the `diffbody` command."""

from diffbody_jax.cli.main import run

run()
