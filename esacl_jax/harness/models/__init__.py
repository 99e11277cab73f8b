"""Model registry and a uniform functional forward pass for models with or without BatchNorm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from esacl_jax.harness.models.mlp import MLP

MODELS = ("mlp", "cnn", "resnet18")


def build_model(name: str, num_classes: int, *, widths=(100, 100), nf: int = 64,
                dtype: Any = jnp.float32, mlp_init: str = "xavier_uniform") -> nn.Module:
    """Builds a registered model by name (config.model)."""
    if name == "mlp":
        return MLP(num_classes=num_classes, widths=tuple(widths), dtype=dtype, init_name=mlp_init)
    if name == "cnn":
        from esacl_jax.harness.models.cnn import SmallCNN

        # config.resnet_nf is the CNN's width too: nf=64 (the default) is (32, 64) conv
        # features and a 128-unit hidden layer; smaller nf scales all three.
        return SmallCNN(num_classes=num_classes, features=(nf // 2, nf), dense=2 * nf)
    if name == "resnet18":
        from esacl_jax.harness.models.resnet import ResNet18

        return ResNet18(num_classes=num_classes, nf=nf, dtype=dtype)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def init_variables(model: nn.Module, key: jax.Array, sample_x: jax.Array) -> tuple[Any, Any]:
    """Returns (params, batch_stats); batch_stats is {} for models without BatchNorm."""
    variables = model.init(key, sample_x, train=False)
    return variables["params"], variables.get("batch_stats", {})


def forward(model: nn.Module, params: Any, batch_stats: Mapping, x: jax.Array,
            train: bool) -> tuple[jax.Array, Any]:
    """Logits and (in train mode) updated BatchNorm statistics; one code path for every model."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
        if train:
            logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits, updated["batch_stats"]
    return model.apply(variables, x, train=train), batch_stats
