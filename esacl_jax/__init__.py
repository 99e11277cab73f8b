"""esacl_jax: efficient continual learning of sparse models (EsaCL) in JAX, Flax and optax."""

__version__ = "0.1.0"
