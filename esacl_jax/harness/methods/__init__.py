"""Method registry: one file per continual-learning method."""

from __future__ import annotations

import importlib

from esacl_jax.harness.methods.base import (
    Batch,
    Method,
    Pass,
    StepMetrics,
    TaskContext,
    TrainState,
    make_optimizer,
)

# name -> "module:Class"; imported lazily so a method's dependencies load only when used.
METHODS = {
    "finetune": "esacl_jax.harness.methods.finetune:Finetune",
    "joint": "esacl_jax.harness.methods.joint:Joint",
    "er": "esacl_jax.harness.methods.er:ER",
    "derpp": "esacl_jax.harness.methods.derpp:DERPP",
    "esacl": "esacl_jax.harness.methods.esacl:EsaCL",
    "ewc": "esacl_jax.harness.methods.ewc:EWC",
    "sparcl": "esacl_jax.harness.methods.sparcl:SparCL",
    "sparcl_ewc": "esacl_jax.harness.methods.sparcl:SparCLEWC",
    "sparcl_er": "esacl_jax.harness.methods.sparcl:SparCLER",
    "sparcl_derpp": "esacl_jax.harness.methods.sparcl:SparCLDERPP",
    "prune_retrain": "esacl_jax.harness.methods.prune_retrain:PruneRetrain",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_method(config, model, benchmark) -> Method:
    return method_class(config.method)(config, model, benchmark)


__all__ = ["Batch", "METHODS", "Method", "Pass", "StepMetrics", "TaskContext", "TrainState",
           "build_method", "make_optimizer", "method_class"]
