"""split_tiny_imagenet: `esacl_jax.harness.config.get_config("split_tiny_imagenet", method)` (docs/PROTOCOLS.md)."""

from esacl_jax.harness.config import get_config as _get_config


def get_config(method: str = "finetune"):
    return _get_config("split_tiny_imagenet", method)
