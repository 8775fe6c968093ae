"""clip_jax: contrastive image-text pretraining in JAX.

`clip_jax.load(workdir)` returns a trained run as a Python object (api.py).
"""

__all__ = ["Model", "load"]


def __getattr__(name):
  # Lazy, so that `python -m clip_jax.<module>` does not import the module
  # twice (runpy warns when the package already imported it).
  if name in __all__:
    from clip_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'clip_jax' has no attribute {name!r}")
