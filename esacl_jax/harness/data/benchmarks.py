"""The continual-learning protocols (shared/design/PROTOCOLS.md) built from the raw datasets.

`load_benchmark(name, ...)` returns a `Benchmark`: split benchmarks assign classes to tasks in
label order (task t gets classes [t*k, (t+1)*k)) unless `class_order_seed` shuffles the class
order; permuted MNIST applies one fixed pixel permutation per task (task 0 included) to all
images, applied lazily when a task's images are read. Labels stay global class ids; images
stay NHWC uint8.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from esacl_jax.harness.data.base import SCENARIOS, Benchmark, DataError, PermutedTask, Task
from esacl_jax.harness.data.sources import RawDataset, load_dataset

MNIST_MEAN_STD = ((0.0,), (1.0,))  # MNIST-family inputs are used in [0, 1], as in mammoth.
CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615))
CIFAR100_MEAN_STD = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
TINY_IMAGENET_MEAN_STD = ((0.4802, 0.4480, 0.3975), (0.2770, 0.2691, 0.2821))

# Independent random streams derived from `seed` (numpy SeedSequence entropy tuples).
_STREAM_TRAIN_SUBSET = 1
_STREAM_TEST_SUBSET = 2
_STREAM_VALIDATION = 3


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """A protocol: which dataset, how it is cut into tasks, how inputs are normalised.

    Attributes:
      name: registry name.
      dataset: raw dataset key (see `esacl_jax.harness.data.sources.DATASETS`).
      num_tasks: protocol task count (overridable by `load_benchmark(num_tasks=...)`).
      classes_per_task: classes per task ("class_il"); all classes for "domain_il".
      scenario: "class_il" or "domain_il".
      num_classes: size of the output head.
      input_shape: one example's (H, W, C).
      mean, std: per-channel normalisation after scaling to [0, 1].
      augment: training augmentation, "none" or "crop_flip".
    """

    name: str
    dataset: str
    num_tasks: int
    classes_per_task: int
    scenario: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"


def _spec(**kwargs) -> BenchmarkSpec:
    spec = BenchmarkSpec(**kwargs)
    assert spec.scenario in SCENARIOS, spec
    return spec


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        _spec(name="split_digits", dataset="digits", num_tasks=5, classes_per_task=2,
              scenario="class_il", num_classes=10, input_shape=(8, 8, 1),
              mean=MNIST_MEAN_STD[0], std=MNIST_MEAN_STD[1]),
        _spec(name="split_mnist", dataset="mnist", num_tasks=5, classes_per_task=2,
              scenario="class_il", num_classes=10, input_shape=(28, 28, 1),
              mean=MNIST_MEAN_STD[0], std=MNIST_MEAN_STD[1]),
        _spec(name="split_fashion_mnist", dataset="fashion_mnist", num_tasks=5,
              classes_per_task=2, scenario="class_il", num_classes=10, input_shape=(28, 28, 1),
              mean=MNIST_MEAN_STD[0], std=MNIST_MEAN_STD[1]),
        _spec(name="permuted_mnist", dataset="mnist", num_tasks=20, classes_per_task=10,
              scenario="domain_il", num_classes=10, input_shape=(28, 28, 1),
              mean=MNIST_MEAN_STD[0], std=MNIST_MEAN_STD[1]),
        _spec(name="split_cifar10", dataset="cifar10", num_tasks=5, classes_per_task=2,
              scenario="class_il", num_classes=10, input_shape=(32, 32, 3),
              mean=CIFAR10_MEAN_STD[0], std=CIFAR10_MEAN_STD[1], augment="crop_flip"),
        _spec(name="split_cifar100", dataset="cifar100", num_tasks=10, classes_per_task=10,
              scenario="class_il", num_classes=100, input_shape=(32, 32, 3),
              mean=CIFAR100_MEAN_STD[0], std=CIFAR100_MEAN_STD[1], augment="crop_flip"),
        _spec(name="split_tiny_imagenet", dataset="tiny_imagenet", num_tasks=10,
              classes_per_task=20, scenario="class_il", num_classes=200,
              input_shape=(64, 64, 3), mean=TINY_IMAGENET_MEAN_STD[0],
              std=TINY_IMAGENET_MEAN_STD[1], augment="crop_flip"),
    )
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Deterministic, stratified index selection (vectorised per class, never per example)


def _rng(seed: int, stream: int, task_id: int) -> np.random.Generator:
    return np.random.default_rng((seed, stream, task_id))


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over classes proportionally to `counts` (largest remainder), capped."""
    exact = counts * (total / counts.sum())
    alloc = np.floor(exact).astype(np.int64)
    short = total - int(alloc.sum())
    if short > 0:
        order = np.argsort(-(exact - alloc), kind="stable")
        alloc[order[:short]] += 1
    return np.minimum(alloc, counts)


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of at most `n` examples, class proportions kept, chosen by `rng`."""
    if n >= labels.shape[0]:
        return np.arange(labels.shape[0])
    classes, counts = np.unique(labels, return_counts=True)
    alloc = _allocate(counts, n)
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=int(k), replace=False)
        for c, k in zip(classes, alloc, strict=True)
    ]
    return np.sort(np.concatenate(picks))


def stratified_holdout(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(keep, holdout) sorted positions: `fraction` of each class held out, at least one per
    class with two or more examples, never a whole class."""
    keep_parts, hold_parts = [], []
    for c in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(pos.shape[0] * fraction))
        k = min(max(k, 1 if pos.shape[0] >= 2 else 0), pos.shape[0] - 1)
        hold_parts.append(pos[:k])
        keep_parts.append(pos[k:])
    return np.sort(np.concatenate(keep_parts)), np.sort(np.concatenate(hold_parts))


# ----------------------------------------------------------------------------------------------
# Benchmark construction


def _check_count(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
        raise ValueError(f"{what} must be a positive integer or None, got {value!r}")


def _resolve_num_tasks(spec: BenchmarkSpec, num_tasks: int | None) -> int:
    if num_tasks is None:
        return spec.num_tasks
    _check_count(num_tasks, "num_tasks")
    if spec.scenario == "class_il":
        most = spec.num_classes // spec.classes_per_task
        if num_tasks > most:
            raise ValueError(
                f"{spec.name}: num_tasks={num_tasks} needs {num_tasks * spec.classes_per_task} "
                f"classes but {spec.dataset} has {spec.num_classes} "
                f"({spec.classes_per_task} per task, at most {most} tasks)"
            )
    return int(num_tasks)


@dataclasses.dataclass(frozen=True)
class _Selection:
    """Options shared by every task: subsets and the validation hold-out."""

    seed: int
    max_train: int | None
    max_test: int | None
    validation_fraction: float


def _select(
    sel: _Selection, task_id: int, y_train: np.ndarray, y_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Positions (into the task's train/test pools) of its train and eval examples.

    Returns (train_pos, eval_pos, eval_from_train). With a validation fraction the eval set is a
    hold-out of the train pool, split before `max_train` so the split itself does not depend on
    the subset size.
    """
    if sel.validation_fraction > 0.0:
        rng = _rng(sel.seed, _STREAM_VALIDATION, task_id)
        train_pos, eval_pos = stratified_holdout(y_train, sel.validation_fraction, rng)
        eval_labels, from_train = y_train[eval_pos], True
    else:
        train_pos, eval_pos = np.arange(y_train.shape[0]), np.arange(y_test.shape[0])
        eval_labels, from_train = y_test, False
    if sel.max_train is not None:
        rng = _rng(sel.seed, _STREAM_TRAIN_SUBSET, task_id)
        train_pos = train_pos[stratified_subset(y_train[train_pos], sel.max_train, rng)]
    if sel.max_test is not None:
        rng = _rng(sel.seed, _STREAM_TEST_SUBSET, task_id)
        eval_pos = eval_pos[stratified_subset(eval_labels, sel.max_test, rng)]
    return train_pos, eval_pos, from_train


def _split_tasks(
    spec: BenchmarkSpec,
    raw: RawDataset,
    num_tasks: int,
    class_order_seed: int | None,
    sel: _Selection,
) -> tuple[Task, ...]:
    order = np.arange(spec.num_classes)
    if class_order_seed is not None:
        order = np.random.default_rng(class_order_seed).permutation(spec.num_classes)
    k = spec.classes_per_task
    tasks = []
    for t in range(num_tasks):
        classes = tuple(sorted(int(c) for c in order[t * k : (t + 1) * k]))
        missing = [c for c in classes if c >= raw.num_classes]
        if missing:
            raise DataError(
                f"{spec.name}: task {t} needs classes {missing} but {raw.source} has only "
                f"{raw.num_classes} classes; use fewer tasks or the full dataset"
            )
        train_idx = np.flatnonzero(np.isin(raw.y_train, classes))
        test_idx = np.flatnonzero(np.isin(raw.y_test, classes))
        train_pos, eval_pos, from_train = _select(
            sel, t, raw.y_train[train_idx], raw.y_test[test_idx]
        )
        eval_idx = (train_idx if from_train else test_idx)[eval_pos]
        train_idx = train_idx[train_pos]
        x_eval, y_eval = (raw.x_train, raw.y_train) if from_train else (raw.x_test, raw.y_test)
        tasks.append(
            Task(
                task_id=t,
                classes=classes,
                x_train=raw.x_train[train_idx],
                y_train=raw.y_train[train_idx],
                x_test=x_eval[eval_idx],
                y_test=y_eval[eval_idx],
            )
        )
    return tuple(tasks)


def pixel_permutations(num_tasks: int, num_pixels: int, seed: int) -> list[np.ndarray]:
    """The permuted-MNIST permutations: task t uses the t-th draw of default_rng(seed)."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(num_pixels) for _ in range(num_tasks)]


def _permuted_tasks(
    spec: BenchmarkSpec, raw: RawDataset, num_tasks: int, sel: _Selection
) -> tuple[Task, ...]:
    shape = raw.x_train.shape[1:]
    pixels = int(np.prod(shape[:2]))
    flat_train = raw.x_train.reshape(raw.x_train.shape[0], pixels, shape[2])
    flat_test = raw.x_test.reshape(raw.x_test.shape[0], pixels, shape[2])
    classes = tuple(range(spec.num_classes))
    # Every task sees the same examples (same subset, same validation split), only permuted
    # differently: the tasks differ in their input distribution alone, as the protocol intends.
    train_pos, eval_pos, from_train = _select(sel, 0, raw.y_train, raw.y_test)
    x_eval, y_eval = (flat_train, raw.y_train) if from_train else (flat_test, raw.y_test)
    x_train_base = (
        flat_train if train_pos.shape[0] == flat_train.shape[0] else flat_train[train_pos]
    )
    x_eval_base = x_eval if eval_pos.shape[0] == x_eval.shape[0] else x_eval[eval_pos]
    y_train_task, y_eval_task = raw.y_train[train_pos], y_eval[eval_pos]
    # One shared copy of the images; each task applies its permutation when read (memory flat
    # in the number of tasks).
    return tuple(
        PermutedTask(
            task_id=t,
            classes=classes,
            permutation=perm,
            base_train=x_train_base,
            y_train=y_train_task,
            base_test=x_eval_base,
            y_test=y_eval_task,
            image_shape=tuple(shape),
        )
        for t, perm in enumerate(pixel_permutations(num_tasks, pixels, sel.seed))
    )


def load_benchmark(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    class_order_seed: int | None = None,
    num_tasks: int | None = None,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    validation_fraction: float = 0.0,
    verify_checksums: bool = True,
) -> Benchmark:
    """Build a continual benchmark from its protocol, reading the data from the local sources.

    Args:
      name: a key of `BENCHMARKS`.
      data_dir: local data directory (else $ESACL_DATA_DIR, then tfds; see `sources`).
      seed: seeds the permuted-MNIST permutations (task t uses the t-th draw of
        `np.random.default_rng(seed)`), the per-task subsets and the validation split.
      class_order_seed: if set, shuffle the class order (`default_rng(class_order_seed)`)
        before cutting it into tasks (class_il only; ignored for domain_il).
      num_tasks: override the protocol's task count (fewer tasks for fast tests; more than the
        classes allow is a ValueError; any count for permuted_mnist).
      max_train_per_task, max_test_per_task: deterministic stratified subsets per task (of the
        eval set, i.e. the validation hold-out when `validation_fraction > 0`). Permuted MNIST
        uses the same subset in every task.
      validation_fraction: if > 0, hold out this fraction of each task's training set
        (stratified, seeded, split before `max_train_per_task`) and use it as the evaluation set
        instead of the test set; recorded in `Benchmark.eval_split` and `Benchmark.source`.
      verify_checksums: compare files with the official checksums (structural checks always run).

    Raises:
      ValueError: bad arguments. DataError: data missing, corrupt or not verified.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    n_tasks = _resolve_num_tasks(spec, num_tasks)
    _check_count(max_train_per_task, "max_train_per_task")
    _check_count(max_test_per_task, "max_test_per_task")
    if not 0.0 <= float(validation_fraction) < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    sel = _Selection(int(seed), max_train_per_task, max_test_per_task, float(validation_fraction))

    raw = load_dataset(spec.dataset, data_dir, verify_checksums=verify_checksums)
    if raw.x_train.shape[1:] != spec.input_shape:
        raise DataError(
            f"{raw.source}: images are {raw.x_train.shape[1:]}, {name} expects {spec.input_shape}"
        )
    if spec.scenario == "domain_il":
        tasks = _permuted_tasks(spec, raw, n_tasks, sel)
    else:
        tasks = _split_tasks(spec, raw, n_tasks, class_order_seed, sel)
    for task in tasks:
        if task.num_train == 0 or task.num_test == 0:
            raise DataError(
                f"{name}: task {task.task_id} (classes {list(task.classes)}) has "
                f"{task.num_train} train and {task.num_test} eval examples in {raw.source}"
            )
    return Benchmark(
        name=name,
        scenario=spec.scenario,
        num_classes=spec.num_classes,
        input_shape=spec.input_shape,
        tasks=tasks,
        mean=spec.mean,
        std=spec.std,
        augment=spec.augment,
        source=_source_note(raw.source, spec, class_order_seed, sel),
        eval_split="validation" if sel.validation_fraction > 0.0 else "test",
    )


def _source_note(source: str, spec: BenchmarkSpec, class_order_seed: int | None,
                 sel: _Selection) -> str:
    """`Benchmark.source`: where the data came from and how it was cut (order, subsets, split)."""
    notes = [source]
    if class_order_seed is not None and spec.scenario == "class_il":
        notes.append(f"class order shuffled with seed {class_order_seed}")
    if sel.max_train is not None or sel.max_test is not None:
        limits = [f"{what}<={n}" for what, n in (("train", sel.max_train), ("eval", sel.max_test))
                  if n is not None]  # fmt: skip
        notes.append(f"per-task subset: {', '.join(limits)} (seed {sel.seed})")
    if sel.validation_fraction > 0.0:
        notes.append(
            f"eval = stratified {sel.validation_fraction:g} hold-out of train (seed {sel.seed}), "
            "test set unused"
        )
    return "; ".join(notes)
