"""finetune: plain SGD on each task in turn, the lower bound that shows catastrophic forgetting."""

from esacl_jax.harness.methods.base import Method


class Finetune(Method):
    name = "finetune"
