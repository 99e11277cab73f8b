"""The method registry: every continual-learning method's name, in one table.

The table maps a name to the "module:Class" that implements it; a class is imported only when it
is asked for (`method_class`), so a method's dependencies load only when it is used, and this
module imports nothing from the methods (the methods import it: `SparseWrapperMethod` builds
its base through `method_class`). Every other list of "all methods" (report tables, the default
comparison sweep) derives from this table.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:Class", in the order reports list the methods (dense ones first, then the
# sparse wrappers, prune-then-retrain and EsaCL).
METHODS: dict[str, str] = {
    "finetune": "esacl_jax.harness.methods.finetune:Finetune",
    "joint": "esacl_jax.harness.methods.joint:Joint",
    "ewc": "esacl_jax.harness.methods.ewc:EWC",
    "er": "esacl_jax.harness.methods.er:ER",
    "derpp": "esacl_jax.harness.methods.derpp:DERPP",
    "co2l": "esacl_jax.harness.methods.co2l:CO2L",
    "sparcl_ewc": "esacl_jax.harness.methods.sparcl:SparCLEWC",
    "sparcl_er": "esacl_jax.harness.methods.sparcl:SparCLER",
    "sparcl_derpp": "esacl_jax.harness.methods.sparcl:SparCLDERPP",
    "sparcl_co2l": "esacl_jax.harness.methods.sparcl:SparCLCO2L",
    "sparcl": "esacl_jax.harness.methods.sparcl:SparCL",
    "prune_retrain": "esacl_jax.harness.methods.prune_retrain:PruneRetrain",
    "esacl": "esacl_jax.harness.methods.esacl:EsaCL",
}

# Methods whose base is chosen by the config (`sparcl.base`): with its default base `sparcl` is
# `sparcl_derpp`, so sweeps over every method leave it out.
BASE_FROM_CONFIG: tuple[str, ...] = ("sparcl",)


def method_names() -> tuple[str, ...]:
    """Every registered method, in the order reports list them.

    Returns:
      The registry's names.
    """
    return tuple(METHODS)


def sweep_methods() -> tuple[str, ...]:
    """The methods a sweep over every method runs: the registry's, less those whose base comes
    from the config (their default duplicates a fixed-base method).

    Returns:
      Method names, in the registry's order.
    """
    return tuple(name for name in METHODS if name not in BASE_FROM_CONFIG)


def method_class(name: str) -> type[Any]:
    """The class implementing method `name` (its module imported on first use).

    Args:
      name: a registered method name.

    Returns:
      The `Method` subclass.

    Raises:
      ValueError: `name` is not registered.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_method(config: Any, model: Any, benchmark: Any) -> Any:
    """The method object of `config.method` on `model` and `benchmark`.

    Args:
      config: the run's config.
      model: the Flax model.
      benchmark: the run's benchmark.

    Returns:
      The `Method` instance.
    """
    return method_class(config.method)(config, model, benchmark)


def config_section(name: str) -> str | None:
    """The config sub-dict holding the method's own knobs.

    Args:
      name: a registered method name.

    Returns:
      The section's name, or None when the method has none.
    """
    return method_class(name).config_section


def config_sections(name: str) -> tuple[str, ...]:
    """Every method-specific config sub-dict the method reads: its own and, for a wrapper,
    its base's (SparCL-CO2L reads `sparcl` and `co2l`).

    Args:
      name: a registered method name.

    Returns:
      The sections' names, its own first.
    """
    cls = method_class(name)
    own = () if cls.config_section is None else (cls.config_section,)
    return own + tuple(s for s in cls.extra_config_sections if s not in own)


def sparsity_key(name: str) -> str | None:
    """The dotted config field of the method's target sparsity.

    Args:
      name: a registered method name.

    Returns:
      E.g. "esacl.sparsity"; None for dense methods.
    """
    cls = method_class(name)
    return f"{cls.config_section}.sparsity" if cls.sparse else None


def known_sparsity_key(name: str) -> str | None:
    """`sparsity_key` for a registered method, None for a name the registry does not know
    (a stored run of a method since removed or renamed).

    Args:
      name: a method name.

    Returns:
      The dotted config field, or None.
    """
    return sparsity_key(name) if name in METHODS else None


def uses_buffer(name: str) -> bool:
    """Whether the method (with its default base) trains with the replay buffer.

    Args:
      name: a registered method name.

    Returns:
      The class's `uses_buffer`.
    """
    return method_class(name).uses_buffer


def section_readers() -> dict[str, frozenset[str]]:
    """Method-specific config sections and the methods that read them.

    Returns:
      {section: the names of the methods reading it}.
    """
    readers: dict[str, set[str]] = {}
    for name in METHODS:
        for section in config_sections(name):
            readers.setdefault(section, set()).add(name)
    return {section: frozenset(names) for section, names in readers.items()}


__all__ = ["BASE_FROM_CONFIG", "METHODS", "build_method", "config_section", "config_sections",
           "known_sparsity_key", "method_class", "method_names", "section_readers",
           "sparsity_key", "sweep_methods", "uses_buffer"]
