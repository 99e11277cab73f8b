"""Prints runs side by side: `python -m experiments.side_by_side WORKDIR [WORKDIR ...]`.

Each WORKDIR holds a results.json written by `experiments.main`. One row per run: class-IL and
task-IL accuracy, forgetting, sparsity over all weights, nonzero weights and training FLOPs (also
as a multiple of the last run's, the baseline `make run` puts last).

With --latest each WORKDIR stands for the newest finished run among WORKDIR, WORKDIR-2,
WORKDIR-3, ...: where the last `experiments.main --workdir=WORKDIR` wrote (it moves to the first
free WORKDIR-N when WORKDIR holds a finished run of another config). `make run` uses it.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

from esacl_jax.harness.workdirs import latest_finished_run

_LATEST = flags.DEFINE_bool("latest", False, "Each WORKDIR stands for the newest finished run "
                            "among WORKDIR, WORKDIR-2, WORKDIR-3, ...")


def load(workdir: str) -> dict:
    path = pathlib.Path(workdir) / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read {path}: {err}") from None


def table(results: list[dict]) -> str:
    header = (f"{'method':10}{'class-IL':>10}{'task-IL':>9}{'forget':>8}{'sparsity*':>11}"
              f"{'nonzero':>10}{'train FLOPs':>13}{'vs last':>9}")
    lines = [header, "-" * len(header)]
    base_flops = results[-1]["training_flops"]
    for r in results:
        m, w = r["metrics"], r.get("weights", {})
        sparsity = f"{100 * w['sparsity']:.1f}%" if w else "n/a"
        nonzero = f"{w['nonzero']:,}" if w else "n/a"
        lines.append(f"{r['method']:10}{100 * m['class_il']['average_accuracy']:9.2f}%"
                     f"{100 * m['task_il']['average_accuracy']:8.2f}%"
                     f"{100 * m['class_il']['forgetting']:8.2f}{sparsity:>11}{nonzero:>10}"
                     f"{r['training_flops']:13.3g}{r['training_flops'] / base_flops:8.2f}x")
    lines.append("* sparsity over all weights (every kernel, bias and norm parameter)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("usage: python -m experiments.side_by_side WORKDIR [WORKDIR ...]")
    workdirs = [latest_finished_run(w) if _LATEST.value else w for w in argv[1:]]
    results = [load(w) for w in workdirs]
    bench = {r["benchmark"]["name"] for r in results}
    print(f"\n{', '.join(sorted(bench))}, seed {results[0]['seed']}")
    print(table(results))


if __name__ == "__main__":
    sys.exit(app.run(main))
