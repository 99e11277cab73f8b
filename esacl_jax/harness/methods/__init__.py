"""Continual-learning methods, one file per method; the registry of their names is
`esacl_jax.harness.methods.registry` (re-exported here)."""

from __future__ import annotations

from esacl_jax.harness.methods.base import (
    Batch,
    Method,
    Pass,
    StepMetrics,
    TaskContext,
    TrainState,
    make_optimizer,
)
from esacl_jax.harness.methods.registry import (
    METHODS,
    build_method,
    config_section,
    config_sections,
    method_class,
    method_names,
    section_readers,
    sparsity_key,
    sweep_methods,
    uses_buffer,
)

__all__ = ["Batch", "METHODS", "Method", "Pass", "StepMetrics", "TaskContext", "TrainState",
           "build_method", "config_section", "config_sections", "make_optimizer", "method_class",
           "method_names", "section_readers", "sparsity_key", "sweep_methods", "uses_buffer"]
