"""Accuracy of a run's exported model, lossless and re-saved with bfloat16 values (lossy).

For each run directory (a finished run of a sparse method: results.json and sparse_model.npz),
rebuilds the run's benchmark and model from results.json's config, loads `sparse_model.npz`,
re-saves it with `esacl_jax.export.save_sparse(..., values_dtype="bfloat16")`, and evaluates both
on the run's evaluation split after the last task: class-IL and task-IL average accuracy (the
final row of the accuracy matrices, as results.json's "ACC"). The lossless file must give the
run's own ACC (checked); the bfloat16 file's change is printed per run and, over several runs,
as the mean of the paired differences ± SE (std / sqrt(n)). Also prints the file sizes against
`np.savez` and `np.savez_compressed` of the dense params.

    python -m experiments.bench.eval_export runs/w400_esacl_s0 runs/w400_esacl_s1 runs/w400_esacl_s2

Exit status: 0 when every run was evaluated, 2 on bad input (a missing or unreadable run; one
line on stderr).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esacl_jax import export
from esacl_jax.harness import loop
from esacl_jax.harness.data import class_mask, preprocess
from esacl_jax.harness.export_model import FILE_NAME
from esacl_jax.harness.models import forward


def accuracy_fn(config: ml_collections.ConfigDict):
    """params -> (class-IL, task-IL) average accuracy over all tasks after the last one, on the
    run's benchmark and model (built once; one compilation for every params of that shape)."""
    benchmark = loop.load_config_benchmark(config)
    model = loop.build_model_for(config, benchmark)
    sample = jnp.zeros((1, *benchmark.input_shape), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample, train=False))
    if shapes.get("batch_stats"):
        raise ValueError(f"model {config.model} has batch statistics, which the export does "
                         "not hold: only models without them (the MLPs) can be evaluated")
    batch_stats: dict = {}

    @jax.jit
    def predict(params, batch_stats, x_raw):  # the harness's evaluation forward (make_predict)
        x = preprocess(x_raw, benchmark.mean, benchmark.std)
        return forward(model, params, batch_stats, x, train=False)[0].astype(jnp.float32)
    k = benchmark.num_classes
    seen = class_mask(benchmark.classes_up_to(len(benchmark.tasks) - 1), k)

    def accuracies(params) -> tuple[float, float]:
        class_il, task_il = [], []
        for task in benchmark.tasks:
            logits = loop.predict_logits(predict, params, batch_stats, task.x_test,
                                         config.eval_batch_size)
            class_il.append(loop.masked_accuracy(logits, task.y_test, seen))
            task_il.append(loop.masked_accuracy(logits, task.y_test,
                                                class_mask(task.classes, k)))
        return float(np.mean(class_il)), float(np.mean(task_il))

    return accuracies


def evaluate_run(workdir: pathlib.Path) -> dict:
    result = json.loads((workdir / "results.json").read_text())
    config = ml_collections.ConfigDict(result["config"])
    params = export.load_sparse(workdir / FILE_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        sizes = {"lossless": export.save_sparse(tmp / "f32.npz", *export.load_sparse(
                     workdir / FILE_NAME, with_masks=True)),
                 "bfloat16": export.save_sparse(tmp / "bf16.npz", *export.load_sparse(
                     workdir / FILE_NAME, with_masks=True), values_dtype="bfloat16"),
                 "dense": export.save_dense(tmp / "d.npz", params),
                 "dense_compressed": export.save_dense(tmp / "dc.npz", params, compressed=True)}
        bf16_params = export.load_sparse(tmp / "bf16.npz")
    accuracies = accuracy_fn(config)
    f32 = accuracies(params)
    recorded = result["metrics"]["class_il"]["average_accuracy"]
    if abs(f32[0] - recorded) > 1e-9:
        raise RuntimeError(f"{workdir}: the exported model gives class-IL {f32[0]:.6f}, the run "
                           f"recorded {recorded:.6f}")
    bf16 = accuracies(bf16_params)
    return {"run": workdir.name, "seed": int(config.seed), "class_il_f32": f32[0],
            "class_il_bf16": bf16[0], "task_il_f32": f32[1], "task_il_bf16": bf16[1],
            "bytes": sizes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write JSON here")
    args = parser.parse_args(argv)
    for workdir in args.workdirs:
        if not (workdir / "results.json").is_file() or not (workdir / FILE_NAME).is_file():
            print(f"error: {workdir} holds no results.json and {FILE_NAME} (a finished run of a "
                  "sparse method)", file=sys.stderr)
            return 2
    try:
        rows = [evaluate_run(w) for w in args.workdirs]
    except (export.SparseFileError, OSError, KeyError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print("| run | seed | class-IL f32 | class-IL bf16 | bf16 - f32 | task-IL bf16 - f32 "
          "| lossless / savez_compressed | bf16 / savez_compressed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = r["bytes"]
        print(f"| {r['run']} | {r['seed']} | {100 * r['class_il_f32']:.2f} | "
              f"{100 * r['class_il_bf16']:.2f} | "
              f"{100 * (r['class_il_bf16'] - r['class_il_f32']):+.2f} | "
              f"{100 * (r['task_il_bf16'] - r['task_il_f32']):+.2f} | "
              f"{b['lossless'] / b['dense_compressed']:.3f} | "
              f"{b['bfloat16'] / b['dense_compressed']:.3f} |")
    diffs = np.array([100 * (r["class_il_bf16"] - r["class_il_f32"]) for r in rows])
    if len(diffs) > 1:
        se = diffs.std(ddof=1) / np.sqrt(len(diffs))
        print(f"class-IL bf16 - f32 over {len(diffs)} runs: {diffs.mean():+.3f} ± {se:.3f} (SE)")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
