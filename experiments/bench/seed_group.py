"""Seeds as one program against separate runs: wall time of N seeds, side by side.

    python -m experiments.bench.seed_group --benchmarks=split_mnist --methods=derpp,esacl \
        --sizes=1,2,5 --data_dir=DATA
    python -m experiments.bench.seed_group --report_only   # the markdown from the CSV

For each (benchmark, method), in one sitting and interleaved (so that the load of a shared
machine falls on all three alike), every run a fresh `python -m experiments.main` process timed
from outside:

- cold separate: seed s alone, JAX's persistent compilation cache off;
- warm separate: seed s alone, the cache on and filled by an untimed run first;
- group: seeds 0..N-1 as one seed group (`--config.seeds`), the cache off (cold).

N separate runs cost the sum of seeds 0..N-1's times. Each seed of the largest group is checked
against its cold separate run: the class-IL and task-IL matrices equal (to the bit) or not.

Writes docs/speed/seed_group.csv (one row per timed process) and docs/speed/seed_group.md (the
table built from it; `--report_only` rebuilds it from the CSV alone).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_BENCHMARKS = flags.DEFINE_list("benchmarks", ["split_mnist"], "experiments/configs names.")
_METHODS = flags.DEFINE_list("methods", ["derpp", "esacl"], "Protocol rows.")
_SIZES = flags.DEFINE_list("sizes", ["1", "2", "5"], "Group sizes N (seeds 0..N-1).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset directory (else $ESACL_DATA_DIR).")
_OUT_DIR = flags.DEFINE_string("out_dir", "docs/speed", "Where the CSV and markdown go.")
_APPEND = flags.DEFINE_bool("append", False, "Add rows to an existing CSV (another sitting).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild the markdown from the CSV.")
_MACHINE = flags.DEFINE_string("machine", "2-core x86-64 CPU VM, Python 3.11, jax 0.10.2 CPU",
                               "The machine, as the report names it.")
_NOTE = flags.DEFINE_string("note", "", "A line on the conditions (e.g. a shared machine).")
_STEP_COST = flags.DEFINE_bool(
    "step_cost", False, "Instead: the training chunk's cost per seed-step, one process, after "
    "compilation: the single run's chunk against the group's vmapped chunk of each size "
    "(docs/speed/seed_group_step.md).")
_WARM_GROUPS = flags.DEFINE_bool(
    "warm_groups", False, "Instead of the separate runs and cold groups: each group size with "
    "the persistent compilation cache, filled by an untimed group run first (rows "
    "group_warm, appended to the CSV).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "--step_cost: chunks timed per case (best kept).")

REPO = pathlib.Path(__file__).resolve().parents[2]
FIELDS = ["benchmark", "method", "kind", "seeds", "wall_s", "train_s", "eval_s",
          "matrices_equal_to_separate", "class_il_group", "class_il_separate", "commit",
          "machine", "note"]


def commit() -> str:
    """The repository's HEAD commit (short), with "+dirty" for uncommitted changes."""
    from esacl_jax.harness.results import GIT_DIRTY

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(GIT_DIRTY, cwd=REPO, capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def timed_run(benchmark: str, method: str, workdir: pathlib.Path, seeds: list[int],
              cache: str | None, group: bool = False) -> float:
    """Wall seconds of one `experiments.main` process: seeds[0] alone, or (`group`) the seeds
    as one seed group; `cache`: the persistent compilation cache's directory (None: off)."""
    args = [sys.executable, "-m", "experiments.main",
            f"--config=experiments/configs/{benchmark}.py:{method}", f"--workdir={workdir}",
            "--config.progress=False", "--config.tensorboard=False"]
    args.append(f"--config.seeds={','.join(map(str, seeds))}" if group
                else f"--config.seed={seeds[0]}")
    env = dict(os.environ, ESACL_COMPILATION_CACHE=cache or "0")
    if _DATA_DIR.value:
        env["ESACL_DATA_DIR"] = _DATA_DIR.value
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return wall


def read(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def measure(benchmark: str, method: str, sizes: list[int], root: pathlib.Path,
            stamp: dict) -> list[dict]:
    """One (benchmark, method): separate cold and warm runs of seeds 0..max-1 and a group of
    each size, interleaved."""
    cache = root / "xla_cache"
    timed_run(benchmark, method, root / "fill", [0], str(cache))  # fills the warm cache
    rows, largest = [], max(sizes)

    def row(kind: str, seeds: list[int], wall: float, result: dict, equal: str = "",
            group_acc: str = "", separate_acc: str = "") -> dict:
        return {"benchmark": benchmark, "method": method, "kind": kind,
                "seeds": " ".join(map(str, seeds)), "wall_s": f"{wall:.2f}",
                "train_s": f"{sum(result['train_time_per_task_s']):.2f}",
                "eval_s": f"{sum(result['eval_time_per_task_s']):.2f}",
                "matrices_equal_to_separate": equal, "class_il_group": group_acc,
                "class_il_separate": separate_acc, **stamp}

    def class_il(result: dict) -> str:
        return f"{result['metrics']['class_il']['average_accuracy']!r}"


    separate = {}
    for seed in range(largest):
        for kind, where in (("cold_separate", None), ("warm_separate", str(cache))):
            workdir = root / f"{kind}_{seed}"
            wall = timed_run(benchmark, method, workdir, [seed], where)
            result = read(workdir / "results.json")
            if kind == "cold_separate":
                separate[seed] = result
            rows.append(row(kind, [seed], wall, result))
            print(f"{benchmark} {method} {kind} seed {seed}: {wall:.1f} s", flush=True)
        if seed + 1 in sizes:
            seeds = list(range(seed + 1))
            workdir = root / f"group_{seed + 1}"
            wall = timed_run(benchmark, method, workdir, seeds, None, group=True)
            results = [read(workdir / f"seed{s}" / "results.json") for s in seeds]
            equal = all(
                np.array_equal(np.asarray(r[k], float), np.asarray(separate[s][k], float))
                for s, r in zip(seeds, results, strict=True)
                for k in ("class_il_matrix", "task_il_matrix"))
            rows.append(row("group_cold", seeds, wall, results[0], "yes" if equal else "no",
                            " ".join(class_il(r) for r in results),
                            " ".join(class_il(separate[s]) for s in seeds)))
            print(f"{benchmark} {method} group of {seed + 1}: {wall:.1f} s "
                  f"(matrices equal to separate runs: {equal})", flush=True)
    return rows


def measure_warm_groups(benchmark: str, method: str, sizes: list[int], root: pathlib.Path,
                        stamp: dict) -> list[dict]:
    """Each group size with a filled persistent compilation cache (untimed runs first), side by
    side with warm separate runs of its seeds in the same sitting (rows warm_separate_w),
    interleaved: half the separate runs, the group, the other half."""
    rows = []

    def row(kind: str, seeds: list[int], wall: float, result: dict) -> dict:
        return {"benchmark": benchmark, "method": method, "kind": kind,
                "seeds": " ".join(map(str, seeds)), "wall_s": f"{wall:.2f}",
                "train_s": f"{sum(result['train_time_per_task_s']):.2f}",
                "eval_s": f"{sum(result['eval_time_per_task_s']):.2f}",
                "matrices_equal_to_separate": "", "class_il_group": "",
                "class_il_separate": "", **stamp}

    for n in sizes:
        cache, seeds = str(root / f"xla_cache_{n}"), list(range(n))
        timed_run(benchmark, method, root / f"fill_group_{n}", seeds, cache, group=True)
        timed_run(benchmark, method, root / f"fill_one_{n}", [0], cache)
        order = seeds[: (n + 1) // 2] + [None] + seeds[(n + 1) // 2:]
        for seed in order:
            if seed is None:
                workdir = root / f"group_warm_{n}"
                wall = timed_run(benchmark, method, workdir, seeds, cache, group=True)
                rows.append(row("group_warm", seeds, wall,
                                read(workdir / "seed0" / "results.json")))
                print(f"{benchmark} {method} warm group of {n}: {wall:.1f} s", flush=True)
            else:
                workdir = root / f"warm_w_{n}_{seed}"
                wall = timed_run(benchmark, method, workdir, [seed], cache)
                rows.append(row("warm_separate_w", [seed], wall,
                                read(workdir / "results.json")))
                print(f"{benchmark} {method} warm separate seed {seed}: {wall:.1f} s",
                      flush=True)
    return rows


def same_sitting(rows: list[dict], group: dict, kind: str, seeds: list[int]) -> list[dict]:
    """The `kind` runs of `seeds` beside `group`: those of its sitting (the same note) when
    that sitting timed every seed, else every such run (sittings that timed each seed once)."""
    found = [r for r in rows if r["kind"] == kind and int(r["seeds"]) in seeds]
    same = [r for r in found if r["note"] == group["note"]]
    return same if len(same) == len(seeds) else found


def summary_rows(records: list[dict]) -> list[dict]:
    """Per (benchmark, method, N): the group's wall time against N cold and N warm separate
    runs (the sums over seeds 0..N-1), and where the group's time went."""
    out = []
    cells = sorted({(r["benchmark"], r["method"]) for r in records})
    for bench, method in cells:
        mine = [r for r in records if (r["benchmark"], r["method"]) == (bench, method)]
        for g in (r for r in mine if r["kind"] == "group_cold"):
            seeds = [int(s) for s in g["seeds"].split()]
            cold = same_sitting(mine, g, "cold_separate", seeds)
            warm = same_sitting(mine, g, "warm_separate", seeds)
            if len(cold) != len(seeds) or len(warm) != len(seeds):
                continue
            cold_s = sum(float(r["wall_s"]) for r in cold)
            warm_s = sum(float(r["wall_s"]) for r in warm)
            wall = float(g["wall_s"])
            train, evaluation = float(g["train_s"]), float(g["eval_s"])
            warm_group = next((float(r["wall_s"]) for r in mine if r["kind"] == "group_warm"
                               and r["seeds"] == g["seeds"] and r["note"] == g["note"]), None)
            beside = [float(r["wall_s"]) for r in mine if r["kind"] == "warm_separate_w"
                      and int(r["seeds"]) in seeds and r["note"] == g["note"]]
            warm_beside = sum(beside) if len(beside) == len(seeds) else None
            out.append({"benchmark": bench, "method": method, "n": len(seeds), "group_s": wall,
                        "cold_s": cold_s, "warm_s": warm_s, "vs_cold": wall / cold_s,
                        "vs_warm": wall / warm_s, "train_s": train, "eval_s": evaluation,
                        "warm_group_s": warm_group, "warm_beside_s": warm_beside,
                        "rest_s": wall - train - evaluation,
                        "sep_train_s": sum(float(r["train_s"]) for r in cold),
                        "equal": g["matrices_equal_to_separate"], "commit": g["commit"],
                        "note": g["note"]})
    return out


def se(x: np.ndarray) -> float:
    """Standard error of the mean: sample std / sqrt(n) (NaN for one value)."""
    return float(np.std(x, ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")


def paired_table(records: list[dict]) -> list[str]:
    """Class-IL of each measured group, paired by seed with the seeds'
    separate runs: the per-seed differences, their mean with its SE, and both means +- SE."""
    groups = [r for r in records if r["kind"] == "group_cold" and r.get("class_il_group")]
    if not groups:
        return []
    lines = ["", "## Class-IL: each seed of the group against its separate run (paired)", "",
             "Average class-IL accuracy (%) after the last task. diff = group - separate, by "
             "seed; SE = sample std / sqrt(seeds).", "",
             "| benchmark | method | seeds | group mean +- SE | separate mean +- SE | "
             "diff by seed | mean diff +- SE | max abs diff |",
             "|---|---|---:|---|---|---|---|---:|"]
    for r in sorted(groups, key=lambda r: (r["benchmark"], r["method"],
                                           len(r["seeds"].split()))):
        bench, method = r["benchmark"], r["method"]
        group = 100 * np.asarray(r["class_il_group"].split(), float)
        separate = 100 * np.asarray(r["class_il_separate"].split(), float)
        diff = group - separate
        lines.append(
            f"| {bench} | {method} | {r['seeds'].replace(' ', ',')} | "
            f"{group.mean():.2f} +- {se(group):.2f} | {separate.mean():.2f} +- "
            f"{se(separate):.2f} | {' '.join(f'{d:+.2f}' for d in diff)} | "
            f"{diff.mean():+.3f} +- {se(diff):.3f} | {np.abs(diff).max():.2f} |")
    return lines


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is unknown."""
    return None if a is None or b is None else a / b


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted, or "not measured"."""
    return "not measured" if value is None else format(value, spec)


def markdown(records: list[dict]) -> str:
    rows = summary_rows(records)
    machines = sorted({r["machine"] for r in records})
    commits = sorted({r["commit"] for r in records})
    notes = sorted({r["note"] for r in records if r["note"]})
    lines = [
        "# Seeds as one program: wall time against separate runs",
        "",
        "Rebuilt from `seed_group.csv` (one row per timed process) by "
        "`python -m experiments.bench.seed_group --report_only`; measured with "
        "`python -m experiments.bench.seed_group` (flags in the CSV's rows: benchmark, method, "
        "seeds).",
        "",
        f"Machine: {'; '.join(machines)}. Commit: {', '.join(commits)}.",
        *([f"Conditions, by sitting: {'; '.join(f'({k + 1}) {n}' for k, n in enumerate(notes))}"]
          if notes else []),
        "",
        "Each timing is one fresh `python -m experiments.main` process timed from outside "
        "(import, data, compilation, training, evaluation, results). N separate runs: the sum "
        "of seeds 0..N-1's processes; cold: JAX's persistent compilation cache off; warm: on "
        "and filled by an untimed run first. The group runs cold. The warm group (where "
        "measured, `--warm_groups`, a later sitting) runs with the cache filled by an untimed "
        "group run, side by side with N warm separate runs of the same sitting (\"N warm "
        "beside it\"; its ratio is to those). Targets (issue 29): 5 seeds in at most 0.5x of "
        "5 cold runs and 0.7x of 5 warm "
        "ones.",
        "",
        "| benchmark | method | N | group (s) | N cold (s) | N warm (s) | group / cold | "
        "group / warm | warm group (s) | N warm beside it (s) | warm group / N warm | "
        "group: train / eval / rest (s) | N separate: train (s) | matrices = separate | "
        "sitting |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['method']} | {r['n']} | {r['group_s']:.1f} | "
            f"{r['cold_s']:.1f} | {r['warm_s']:.1f} | {r['vs_cold']:.2f} | "
            f"{r['vs_warm']:.2f} | {fmt(r['warm_group_s'], '.1f')} | "
            f"{fmt(r['warm_beside_s'], '.1f')} | "
            f"{fmt(ratio(r['warm_group_s'], r['warm_beside_s']), '.2f')} | "
            f"{r['train_s']:.1f} / {r['eval_s']:.1f} / "
            f"{r['rest_s']:.1f} | {r['sep_train_s']:.1f} | {r['equal']} | "
            f"{notes.index(r['note']) + 1 if r['note'] in notes else ''} |")
    lines += paired_table(records)
    lines += [
        "",
        "rest: the process's time outside training and evaluation (Python and JAX import, "
        "data, the seeds' initialisation, compilation not overlapped with training, results "
        "and export). \"matrices = separate\": every seed's class-IL and task-IL matrices "
        "equal, to the bit, to its cold separate run's.",
        "",
    ]
    return "\n".join(lines)


def read_csv(path: pathlib.Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def step_cost(benchmark: str, method: str, sizes: list[int], repeats: int) -> list[str]:
    """Microseconds per seed-step of task 0's first chunk (250 steps): the single run's
    compiled chunk, and the group's vmapped chunk for each size (best of `repeats`)."""
    import jax

    from esacl_jax.harness import loop, seed_group
    from esacl_jax.harness.config import get_config
    from esacl_jax.harness.methods.base import make_train_chunk

    config = get_config(benchmark, method)
    config.data_dir = _DATA_DIR.value or ""
    largest = max(sizes)
    runs = seed_group.build_group(config, tuple(range(largest)), loop.build_method)
    states = seed_group.init_states(runs)
    x, y, ctx = loop.task_arrays(runs[0].benchmark, 0)
    spc, batch = config.steps_per_call, config.batch_size
    order = [loop.epoch_batches(st.rng, np.arange(x.shape[0], dtype=np.int32), batch, spc,
                                folds=(1_000_003, 0))[0][:spc] for st in states]
    valid = np.ones((spc,), bool)

    def best(fn, make_state) -> float:
        jax.block_until_ready(fn(make_state()))  # compiles
        times = []
        for _ in range(repeats):
            state = make_state()
            jax.block_until_ready(state)
            start = time.perf_counter()
            jax.block_until_ready(fn(state))
            times.append(time.perf_counter() - start)
        return min(times)

    single = make_train_chunk(runs[0].method)
    base = best(lambda st: single(st, x, y, order[0], valid, ctx),
                lambda: jax.tree.map(lambda a: a.copy(), states[0]))
    rows = [f"| {benchmark} | {method} | single run | 1 | {1e6 * base / spc:.0f} | 1.00 |"]
    for n in sizes:
        chunk = seed_group.make_group_chunk(single, True)
        ctxs = seed_group.stack([ctx] * n)
        idx, ok = np.stack(order[:n]), np.stack([valid] * n)
        t = best(lambda st, idx=idx, ok=ok, ctxs=ctxs, chunk=chunk: chunk(st, x, y, idx, ok, ctxs),
                 lambda n=n: seed_group.stack(states[:n]))
        per_seed = t / (n * spc)
        rows.append(f"| {benchmark} | {method} | group (vmap) | {n} | {1e6 * per_seed:.0f} | "
                    f"{per_seed * spc / base:.2f} |")
        print(rows[-1], flush=True)
    return rows


def write_step_cost() -> None:
    sizes = sorted(int(s) for s in _SIZES.value)
    lines = ["# Seeds as one program: the training chunk's cost per seed-step", "",
             "Rebuilt by `python -m experiments.bench.seed_group --step_cost "
             f"--benchmarks={','.join(_BENCHMARKS.value)} --methods={','.join(_METHODS.value)} "
             f"--sizes={','.join(map(str, sizes))}`. Machine: {_MACHINE.value}. "
             f"Commit: {commit()}.", *([f"Conditions: {_NOTE.value}"] if _NOTE.value else []),
             "",
             "Task 0's first compiled chunk (250 steps of batch 10), after compilation, best of "
             f"{_REPEATS.value}, in one process: the single run's chunk, then the group's "
             "vmapped chunk for N seeds. µs per seed-step = chunk time / (N x 250); ratio: to "
             "the single run's.", "",
             "| benchmark | method | chunk | N | µs per seed-step | / single |",
             "|---|---|---|---:|---:|---:|"]
    for bench in _BENCHMARKS.value:
        for method in _METHODS.value:
            lines += step_cost(bench, method, sizes, _REPEATS.value)
    out = REPO / _OUT_DIR.value / "seed_group_step.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def main(argv: list[str]) -> None:
    del argv
    if _STEP_COST.value:
        write_step_cost()
        return
    out_dir = REPO / _OUT_DIR.value
    csv_path, md_path = out_dir / "seed_group.csv", out_dir / "seed_group.md"
    if not _REPORT_ONLY.value:
        stamp = {"commit": commit(), "machine": _MACHINE.value, "note": _NOTE.value}
        sizes = sorted(int(s) for s in _SIZES.value)
        records = read_csv(csv_path) if _APPEND.value and csv_path.exists() else []
        root = pathlib.Path(tempfile.mkdtemp(prefix="bench_seed_group_"))
        try:
            for bench in _BENCHMARKS.value:
                for method in _METHODS.value:
                    where = root / f"{bench}_{method}"
                    records += (measure_warm_groups if _WARM_GROUPS.value else measure)(
                        bench, method, sizes, where, stamp)
                    out_dir.mkdir(parents=True, exist_ok=True)
                    with csv_path.open("w", newline="", encoding="utf-8") as f:
                        writer = csv.DictWriter(f, FIELDS)
                        writer.writeheader()
                        writer.writerows(records)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if not csv_path.exists():
        print(f"error: {csv_path} does not exist: measure first", file=sys.stderr)
        sys.exit(1)
    md_path.write_text(markdown(read_csv(csv_path)), encoding="utf-8")
    print(f"wrote {md_path}")


if __name__ == "__main__":
    app.run(main)
