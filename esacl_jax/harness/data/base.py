"""Continual benchmarks as plain host arrays: a sequence of tasks, each with its class set.

A benchmark is built once on the host (numpy) and moved to the device by the training loop;
images stay in their compact dtype (uint8) until `preprocess` runs inside the jit-compiled step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCENARIOS = ("class_il", "domain_il")


class DataError(RuntimeError):
    """A dataset could not be found, read or verified. The message says what to do."""


class _Counts:
    """num_train / num_test from the label arrays (shared by the task types)."""

    y_train: np.ndarray
    y_test: np.ndarray

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])


@dataclasses.dataclass(frozen=True)
class Task(_Counts):
    """One task: its global class ids and its train/test arrays (labels are global ids)."""

    task_id: int
    classes: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class PermutedTask(_Counts):
    """A task whose images are base images shared by every task with one fixed pixel
    permutation, applied each time `x_train` or `x_test` is read.

    It holds the permutation, not a permuted copy, so a benchmark's memory stays flat in its
    number of tasks (permuted MNIST); each read returns a fresh array, released by the caller
    when done (the loop keeps one task's training images at a time). Otherwise like `Task`.
    """

    task_id: int
    classes: tuple[int, ...]
    permutation: np.ndarray  # int [pixels]: flat pixel order of this task
    base_train: np.ndarray  # [n, pixels, channels], shared
    y_train: np.ndarray
    base_test: np.ndarray  # [m, pixels, channels], shared
    y_test: np.ndarray
    image_shape: tuple[int, ...]  # one example's shape, e.g. (28, 28, 1)

    def _permuted(self, base: np.ndarray) -> np.ndarray:
        return np.take(base, self.permutation, axis=1).reshape((-1, *self.image_shape))

    @property
    def x_train(self) -> np.ndarray:
        return self._permuted(self.base_train)

    @property
    def x_test(self) -> np.ndarray:
        return self._permuted(self.base_test)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A continual benchmark.

    Attributes:
      name: registry name, e.g. "split_mnist".
      scenario: "class_il" (disjoint classes per task; evaluated class-IL and task-IL) or
        "domain_il" (same classes, new input distribution per task, e.g. permuted MNIST).
      num_classes: size of the single output head.
      input_shape: shape of one example, e.g. (28, 28, 1) or (32, 32, 3).
      tasks: the task sequence.
      mean, std: per-channel normalisation applied after scaling uint8 inputs to [0, 1].
      augment: "none" or "crop_flip" (pad-4 random crop + horizontal flip, CIFAR protocol).
      source: where the data came from (a path, "tfds", "sklearn"), recorded in results.json.
      eval_split: what the tasks' x_test/y_test hold: "test" (the official test split) or
        "validation" (a stratified hold-out of each task's training set, for tuning
        hyper-parameters without touching the test set).
    """

    name: str
    scenario: str
    num_classes: int
    input_shape: tuple[int, ...]
    tasks: tuple[Task | PermutedTask, ...]
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    augment: str = "none"
    source: str = ""
    eval_split: str = "test"

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def classes_up_to(self, task_id: int) -> tuple[int, ...]:
        """Union of the classes of tasks 0..task_id, sorted."""
        seen: set[int] = set()
        for task in self.tasks[: task_id + 1]:
            seen.update(task.classes)
        return tuple(sorted(seen))


def class_mask(classes: Sequence[int], num_classes: int) -> np.ndarray:
    """Boolean vector over the head, True for the given classes."""
    mask = np.zeros((num_classes,), dtype=bool)
    mask[list(classes)] = True
    return mask


def preprocess(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """uint8 (or float in [0, 255]) images -> normalised float32, inside jit."""
    x = x.astype(jnp.float32) / 255.0
    mean_arr = jnp.asarray(mean, jnp.float32)
    std_arr = jnp.asarray(std, jnp.float32)
    return (x - mean_arr) / std_arr
