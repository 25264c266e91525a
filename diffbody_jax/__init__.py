"""diffbody_jax: DiffBody human-body restoration in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import diffbody_jax` stays cheap and free of the interop's file readers.
    if name in ("load_pretrained", "save_pretrained"):
        from diffbody_jax.interop import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'diffbody_jax' has no attribute {name!r}")
