"""Permuted MNIST keeps one copy of the images: memory flat in the number of tasks."""

from __future__ import annotations

import numpy as np

from esacl_jax.harness.data import load_benchmark
from esacl_jax.harness.data.benchmarks import pixel_permutations


def _held_bytes(bench) -> int:
    """Bytes of the distinct arrays the benchmark's tasks hold."""
    arrays = {}
    for task in bench.tasks:
        for value in vars(task).values():
            if isinstance(value, np.ndarray):
                arrays[id(value)] = value.nbytes
    return sum(arrays.values())


def test_permuted_tasks_hold_no_permuted_copies(shared_data_dir):
    kwargs = dict(data_dir=shared_data_dir, max_train_per_task=2000, max_test_per_task=500)
    two = load_benchmark("permuted_mnist", num_tasks=2, **kwargs)
    fifty = load_benchmark("permuted_mnist", num_tasks=50, **kwargs)
    # Only the 784-entry permutations grow with the number of tasks.
    assert _held_bytes(fifty) - _held_bytes(two) == 48 * two.tasks[0].permutation.nbytes
    perms = pixel_permutations(50, 784, 0)
    for t in (0, 49):
        task = fifty.tasks[t]
        base = fifty.tasks[0].base_train
        expected = np.take(base, perms[t], axis=1).reshape(-1, 28, 28, 1)
        assert np.array_equal(task.x_train, expected)
        assert task.x_train.dtype == np.uint8 and task.x_test.shape == (500, 28, 28, 1)
        assert task.num_train == 2000 and task.y_train.shape == (2000,)
    assert np.array_equal(fifty.tasks[1].x_test, two.tasks[1].x_test)
