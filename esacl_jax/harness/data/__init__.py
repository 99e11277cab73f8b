"""Continual-learning data: benchmark protocols, dataset sources and on-device augmentation."""

from esacl_jax.harness.data.augment import augment_batch, random_crop_flip
from esacl_jax.harness.data.base import Benchmark, DataError, Task, class_mask, preprocess
from esacl_jax.harness.data.benchmarks import BENCHMARKS, BenchmarkSpec, load_benchmark

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkSpec",
    "DataError",
    "Task",
    "augment_batch",
    "class_mask",
    "load_benchmark",
    "preprocess",
    "random_crop_flip",
]
