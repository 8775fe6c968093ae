"""clip_jax: contrastive image-text pretraining in JAX.

`clip_jax.load(workdir)` returns a trained run as a Python object (api.py).
"""

from clip_jax.api import Model, load

__all__ = ["Model", "load"]
