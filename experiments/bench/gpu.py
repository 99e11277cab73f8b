"""Accelerator benchmark: training images/s and peak device memory per method.

    python -m experiments.bench.gpu [--data_dir=...] [--out=docs/bench_gpu.md]
    python -m experiments.bench.gpu --steps=3 --resnet_nf=4 --batch=8   # CPU smoke run

Rows: the reduced/full ResNet-18 (``--resnet_nf``, batch ``--batch``) on split_fashion_mnist
(the real data when found, else generated images of its shape, said in the table) and on
generated CIFAR-shaped data (random uint8 32x32x3, 5 tasks of 2 classes, crop+flip
augmentation; no download), then the MLP (784-100-100-10) on split_fashion_mnist at each
``--mlp_batches`` size; for each: finetune, DER++, EsaCL step variants A/B/C and SparCL-DER++.

Each row compiles the method's training chunk (``--steps`` steps, one lax.scan, exactly the
harness's `make_train_chunk`) on task 0, runs it once to warm up, then times ``--repeats`` calls
and keeps the best. images/s counts the current-task batch only (replay examples are extra
work, not extra images). Peak device memory is `jax.Device.memory_stats()["peak_bytes_in_use"]`
where the backend reports it (GPU, TPU), else None; the peak is per process, so with
``--isolate`` (the default on accelerators) every row runs in a fresh subprocess. "compiled
MiB" is XLA's static estimate for the chunk (arguments + outputs + temporaries - aliased), which
every backend reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import app, flags

from esacl_jax.harness.sweep.provenance import portable_command

_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Directory with fashion_mnist/ (else $ESACL_DATA_DIR; generated "
                                "images of its shape when neither has it).")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown table to this file.")
_STEPS = flags.DEFINE_integer("steps", 100, "Steps per timed compiled chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed chunks per row (best is kept).")
_BATCH = flags.DEFINE_integer("batch", 32, "ResNet-18 batch (current and replay minibatch).")
_RESNET_NF = flags.DEFINE_integer("resnet_nf", 64, "ResNet-18 base width (64: the full model).")
_MLP_BATCHES = flags.DEFINE_list("mlp_batches", ["10", "128"], "MLP batch sizes.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_METHODS = flags.DEFINE_list("methods", ["finetune", "derpp", "esacl_A", "esacl_B", "esacl_C",
                                         "sparcl_derpp"], "Method rows (esacl_X: step variant).")
_SUITES = flags.DEFINE_list("suites", ["resnet_fmnist", "resnet_cifar", "mlp"],
                            "Which groups of rows to run.")
_TRAIN_PER_TASK = flags.DEFINE_integer("train_per_task", 2000,
                                       "Training examples per task kept (generated data size).")
_ISOLATE = flags.DEFINE_enum("isolate", "auto", ["auto", "yes", "no"],
                             "Each row in its own process (auto: yes unless the backend is CPU).")
_ROW = flags.DEFINE_integer("row", -1, "Internal: run only this row and print it as JSON.")

# Method rows: label -> (registry name, esacl overrides).
METHOD_ROWS = {
    "finetune": ("finetune", {}),
    "derpp": ("derpp", {}),
    "esacl_A": ("esacl", {"step_variant": "A"}),
    "esacl_B": ("esacl", {"step_variant": "B"}),
    "esacl_C": ("esacl", {"step_variant": "C"}),
    "sparcl_derpp": ("sparcl_derpp", {}),
}
LABELS = {"finetune": "finetune", "derpp": "DER++", "esacl_A": "EsaCL A", "esacl_B": "EsaCL B",
          "esacl_C": "EsaCL C", "sparcl_derpp": "SparCL-DER++"}


def row_specs() -> list[dict[str, Any]]:
    """Every (data, model, batch, method) row the flags ask for, in table order."""
    for method in _METHODS.value:
        if method not in METHOD_ROWS:
            raise app.UsageError(f"unknown method row {method!r}; known: {', '.join(METHOD_ROWS)}")
    groups = []
    if "resnet_fmnist" in _SUITES.value:
        groups.append(("split_fashion_mnist", "resnet18", _BATCH.value))
    if "resnet_cifar" in _SUITES.value:
        groups.append(("synthetic_cifar", "resnet18", _BATCH.value))
    if "mlp" in _SUITES.value:
        groups += [("split_fashion_mnist", "mlp", int(b)) for b in _MLP_BATCHES.value]
    return [dict(data=d, model=m, batch=b, method=meth) for d, m, b in groups
            for meth in _METHODS.value]


def synthetic_benchmark(name: str, input_shape: tuple[int, ...], n: int, augment: str,
                        mean, std):
    """5 tasks x 2 classes of random uint8 images (no download), test split of n // 4."""
    import numpy as np

    from esacl_jax.harness.data.base import Benchmark, Task

    rng = np.random.default_rng(0)
    tasks = []
    for t in range(5):
        classes = (2 * t, 2 * t + 1)

        def split(size: int, classes=classes):
            x = rng.integers(0, 256, (size, *input_shape), dtype=np.uint8)
            return x, rng.choice(np.asarray(classes, np.int64), size)

        (xtr, ytr), (xte, yte) = split(n), split(max(1, n // 4))
        tasks.append(Task(task_id=t, classes=classes, x_train=xtr, y_train=ytr, x_test=xte,
                          y_test=yte))
    return Benchmark(name=name, scenario="class_il", num_classes=10, input_shape=input_shape,
                     tasks=tuple(tasks), mean=mean, std=std, augment=augment, source="generated")


def load_data(data: str, data_dir: str | None):
    """(benchmark, note): the real split_fashion_mnist when found, else generated data."""
    from esacl_jax.harness.data import load_benchmark
    from esacl_jax.harness.data.benchmarks import BENCHMARKS

    if data == "synthetic_cifar":
        spec = BENCHMARKS["split_cifar10"]
        return synthetic_benchmark("synthetic_cifar", (32, 32, 3), _TRAIN_PER_TASK.value,
                                   "crop_flip", spec.mean, spec.std), "generated"
    spec = BENCHMARKS[data]
    if data_dir:
        try:
            return load_benchmark(data, data_dir=data_dir,
                                  max_train_per_task=_TRAIN_PER_TASK.value,
                                  max_test_per_task=100), "real"
        except Exception as err:  # noqa: BLE001 - any data problem: fall back, and say so
            print(f"note: {data} not loaded from {data_dir} ({type(err).__name__}); "
                  "using generated images of its shape", file=sys.stderr)
    return synthetic_benchmark(data, tuple(spec.input_shape), _TRAIN_PER_TASK.value, "none",
                               spec.mean, spec.std), "generated"


def peak_device_bytes(device) -> int | None:
    """The backend's peak bytes in use (None where it keeps no statistics, e.g. CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - unsupported on this backend
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def measure_row(spec: dict[str, Any], data_dir: str | None) -> dict[str, Any]:
    """Compile and time one row; returns its table fields."""
    import jax
    import numpy as np

    from esacl_jax.harness import loop as train
    from esacl_jax.harness.config import get_config

    name, esacl_overrides = METHOD_ROWS[spec["method"]]
    benchmark, source = load_data(spec["data"], data_dir)
    protocol = "split_cifar10" if spec["model"] == "resnet18" else "split_fashion_mnist"
    config = get_config(protocol, name)
    config.benchmark = benchmark.name if spec["data"] != "synthetic_cifar" else "split_cifar10"
    config.model = spec["model"]
    config.resnet_nf = _RESNET_NF.value
    config.dtype = _DTYPE.value
    config.batch_size = config.replay_batch_size = spec["batch"]
    config.steps_per_call = _STEPS.value
    config.esacl.update(esacl_overrides)
    _, method = train.build_config_method(config, benchmark)
    run_chunk = train.make_train_chunk(method)
    x, y, ctx = train.task_arrays(benchmark, 0)
    task = benchmark.tasks[0]
    steps = _STEPS.value
    batch_idx, valid, real = train.epoch_batches(
        jax.random.key(1), np.arange(task.num_train, dtype=np.int32), spec["batch"], steps)
    if real < steps:
        raise app.UsageError(f"--steps={steps} needs {steps * spec['batch']} training examples; "
                             f"raise --train_per_task (now {_TRAIN_PER_TASK.value})")
    state = jax.jit(method.init)(jax.random.key(0))
    state = method.begin_task(state, 0)
    state = method.begin_epoch(state, 0, 0)
    idx, ok = batch_idx[:steps], valid[:steps]
    compiled = run_chunk.lower(state, x, y, idx, ok, ctx).compile()
    mem = compiled.memory_analysis()
    static_mib = None
    if mem is not None:
        static_mib = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
    state, _ = run_chunk(state, x, y, idx, ok, ctx)  # warm-up (and the first buffer fill)
    jax.block_until_ready(state)
    best = float("inf")
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        state, metrics = run_chunk(state, x, y, idx, ok, ctx)
        jax.block_until_ready((state, metrics))
        best = min(best, time.perf_counter() - start)
    peak = peak_device_bytes(jax.devices()[0])
    return dict(spec, source=source, images_per_s=steps * spec["batch"] / best,
                ms_per_step=best / steps * 1e3, static_mib=static_mib,
                peak_mib=None if peak is None else peak / 2**20)


def run_isolated(index: int, argv: list[str]) -> dict[str, Any]:
    """One row in a fresh process (so the device's peak memory is that row's)."""
    args = [a for a in argv[1:] if not a.startswith(("--row", "--isolate", "--out"))]
    proc = subprocess.run([sys.executable, "-m", "experiments.bench.gpu", *args,
                           f"--row={index}", "--isolate=no"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"row {index} failed: {tail}")


def fmt(value: float | None, digits: int = 1) -> str:
    return "None" if value is None else f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]], device: str, argv: list[str]) -> str:
    lines = [f"# Accelerator benchmark on {device}", "",
             f"- command: `python -m experiments.bench.gpu {portable_command(' '.join(argv[1:]))}`",
             f"- ResNet-18 nf={_RESNET_NF.value}, dtype {_DTYPE.value}, {_STEPS.value} steps per "
             f"timed chunk, best of {_REPEATS.value}; images/s counts current-task images only",
             "", "| data | model | batch | method | images/s | ms/step | peak device MiB "
             "| compiled MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        data = r["data"] + (" (generated)" if r["source"] == "generated"
                            and r["data"] != "synthetic_cifar" else "")
        lines.append(f"| {data} | {r['model']} | {r['batch']} | {LABELS[r['method']]} "
                     f"| {fmt(r['images_per_s'], 0)} | {fmt(r['ms_per_step'], 2)} "
                     f"| {fmt(r['peak_mib'])} | {fmt(r['static_mib'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    data_dir = _DATA_DIR.value or os.environ.get("ESACL_DATA_DIR") or None
    specs = row_specs()
    if _ROW.value >= 0:
        print("ROW " + json.dumps(measure_row(specs[_ROW.value], data_dir)), flush=True)
        return
    import jax

    device = jax.devices()[0]
    device_name = f"{device.platform.upper()} {device.device_kind} (jax {jax.__version__})"
    isolate = _ISOLATE.value == "yes" or (_ISOLATE.value == "auto" and device.platform != "cpu")
    rows = []
    for i, spec in enumerate(specs):
        row = run_isolated(i, sys.argv) if isolate else measure_row(spec, data_dir)
        rows.append(row)
        print(f"{spec['data']} {spec['model']} b{spec['batch']} {spec['method']}: "
              f"{row['images_per_s']:,.0f} images/s", file=sys.stderr, flush=True)
    report = table(rows, device_name, sys.argv)
    print(report)
    if _OUT.value:
        from esacl_jax.harness.atomic_io import write_text_atomic

        write_text_atomic(_OUT.value, report)


if __name__ == "__main__":
    app.run(main)
