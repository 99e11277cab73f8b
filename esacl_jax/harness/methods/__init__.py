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
    "co2l": "esacl_jax.harness.methods.co2l:CO2L",
    "sparcl_co2l": "esacl_jax.harness.methods.sparcl:SparCLCO2L",
    "prune_retrain": "esacl_jax.harness.methods.prune_retrain:PruneRetrain",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_method(config, model, benchmark) -> Method:
    return method_class(config.method)(config, model, benchmark)


def config_section(name: str) -> str | None:
    """The config sub-dict holding the method's own knobs (None: it has none)."""
    return method_class(name).config_section


def config_sections(name: str) -> tuple[str, ...]:
    """Every method-specific config sub-dict the method reads: its own and, for a wrapper,
    its base's (SparCL-CO2L reads `sparcl` and `co2l`)."""
    cls = method_class(name)
    own = () if cls.config_section is None else (cls.config_section,)
    return own + tuple(s for s in cls.extra_config_sections if s not in own)


def sparsity_key(name: str) -> str | None:
    """The dotted config field of the method's target sparsity; None for dense methods."""
    cls = method_class(name)
    return f"{cls.config_section}.sparsity" if cls.sparse else None


def uses_buffer(name: str) -> bool:
    """Whether the method (with its default base) trains with the replay buffer."""
    return method_class(name).uses_buffer


def section_readers() -> dict[str, frozenset[str]]:
    """Method-specific config sections -> the methods that read them."""
    readers: dict[str, set[str]] = {}
    for name in METHODS:
        for section in config_sections(name):
            readers.setdefault(section, set()).add(name)
    return {section: frozenset(names) for section, names in readers.items()}


__all__ = ["Batch", "METHODS", "Method", "Pass", "StepMetrics", "TaskContext", "TrainState",
           "build_method", "config_section", "config_sections", "make_optimizer", "method_class",
           "section_readers", "sparsity_key", "uses_buffer"]
