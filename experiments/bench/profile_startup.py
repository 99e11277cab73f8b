"""Where a whole run's time goes: interpreter, imports, data, compilations, training, evaluation.

    python -m experiments.bench.profile_startup --data_dir=../shared/data --methods=derpp,esacl \
        --repeats=3 [--out=docs/speed/profile_startup.md]

Each measurement is a fresh process running exactly what `experiments.main` runs (split_mnist,
`--config.tensorboard=False --config.progress=False`), once with the persistent compilation cache
off ("cold") and once with a cache filled by an untimed run first ("warm"). Inside the child:

- imports: `experiments.main`'s import (jax, flax, optax, the harness);
- data: `load_config_benchmark` (reading and splitting the IDX files);
- compilation: every program JAX traces, lowers and compiles (or reads from the cache), by name,
  from `jax.monitoring`'s time spans;
- training and evaluation: the loop's own per-task times minus the compilations inside them;
- the rest (config, method set-up, results.json, export) is the remainder.

The process's wall time is measured from outside; "interpreter and exit" is what the child
cannot see (python start-up before its first line, and tear-down).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}


def _child(method: str, workdir: str, data_dir: str, out_json: str) -> None:
    """Runs one split_mnist experiment in this process, timing its phases; writes out_json."""
    t0 = time.perf_counter()
    import experiments.main as main_mod  # noqa: F401 - the import being timed
    t_imports = time.perf_counter() - t0

    import jax
    from jax import monitoring

    from esacl_jax.harness import loop
    from experiments.configs.split_mnist import get_config

    spans: list[tuple[str, str, float, float, bool]] = []
    main_thread = threading.main_thread()
    monitoring.register_event_time_span_listener(
        lambda event, start, end, **kw: spans.append(
            (event, str(kw.get("fun_name", "?")).removeprefix("jit(").removesuffix(")"), start,
             end, threading.current_thread() is main_thread)) if event in _COMPILE_EVENTS
        else None)
    cache_reads: list[float] = []
    monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: cache_reads.append(duration)
        if event == "/jax/compilation_cache/cache_retrieval_time_sec" else None)

    data_time = [0.0]
    original_load = loop.load_config_benchmark

    def timed_load(config):
        start = time.perf_counter()
        try:
            return original_load(config)
        finally:
            data_time[0] += time.perf_counter() - start

    loop.load_config_benchmark = timed_load
    config = get_config(method)
    with config.unlocked():
        config.data_dir = data_dir
        config.tensorboard = False
        config.progress = False
    main_mod.enable_compilation_cache()
    t_run = time.perf_counter()
    result = loop.train_and_evaluate(config, workdir, progress=False)
    run_time = time.perf_counter() - t_run
    jax.effects_barrier()

    by_name: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: collections.defaultdict(float))
    counts: collections.Counter = collections.Counter()
    for event, name, start, end, on_main in spans:
        by_name[name][_COMPILE_EVENTS[event]] += end - start
        by_name[name]["background"] = float(not on_main)
        if _COMPILE_EVENTS[event] == "compile":
            counts[name] += 1
    compile_main = sum(end - start for _, _, start, end, on_main in spans if on_main)
    compile_background = sum(end - start for _, _, start, end, on_main in spans if not on_main)
    json.dump({
        "method": method,
        "imports_s": t_imports,
        "data_s": data_time[0],
        "run_s": run_time,
        "train_s": float(sum(result["train_time_per_task_s"])),
        "eval_s": float(sum(result["eval_time_per_task_s"])),
        "compile_s": compile_main,
        "compile_background_s": compile_background,
        "cache_read_s": float(sum(cache_reads)),
        "programs": {name: {**parts, "count": counts[name]} for name, parts in by_name.items()},
        "class_il": result["metrics"]["class_il"]["average_accuracy"],
        "child_total_s": time.perf_counter() - t0,
    }, open(out_json, "w"))


def _measure(method: str, data_dir: str, cache_dir: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "profile.json")
        env = dict(os.environ, ESACL_COMPILATION_CACHE=cache_dir or "0")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "experiments.bench.profile_startup", "--child",
                        method, os.path.join(tmp, "run"), data_dir, out_json],
                       cwd=REPO, env=env, check=True)
        wall = time.perf_counter() - start
        profile = json.load(open(out_json))
    profile["wall_s"] = wall
    return profile


def _phases(p: dict) -> dict[str, float]:
    """Disjoint phases summing to the process's wall time."""
    compile_in_run = p["compile_s"]
    train = p["train_s"] + p["eval_s"] - compile_in_run
    phases = {
        "interpreter and exit": p["wall_s"] - p["child_total_s"],
        "imports": p["imports_s"],
        "data": p["data_s"],
        "compilation on the main thread (trace, lower, compile or cache read)": compile_in_run,
        "training and evaluation (compiled)": train,
    }
    phases["other (config, init, results, export)"] = p["wall_s"] - sum(phases.values())
    return phases


def _report(rows: dict[tuple[str, str], list[dict]]) -> str:
    lines = []
    for (method, cache), profiles in rows.items():
        best = min(profiles, key=lambda p: p["wall_s"])
        walls = ", ".join(f"{q['wall_s']:.2f}" for q in profiles)
        lines.append(f"### {method}, {cache} (best of {len(profiles)} by wall: {walls} s)\n")
        lines.append("| phase | seconds |\n|---|---|")
        for name, seconds in _phases(best).items():
            lines.append(f"| {name} | {seconds:.2f} |")
        lines.append(f"| **process wall time** | **{best['wall_s']:.2f}** |")
        lines.append(f"| (compilation in background threads, overlapped with the above) | "
                     f"{best.get('compile_background_s', 0.0):.2f} |\n")
        lines.append("| program | compilations | thread | trace | lower | compile or cache read |"
                     "\n|---|---|---|---|---|---|")
        for name, parts in sorted(best["programs"].items(),
                                  key=lambda kv: -sum(v for k, v in kv[1].items()
                                                      if k not in ("count", "background"))):
            thread = "background" if parts.get("background") else "main"
            lines.append(f"| {name} | {int(parts.get('count', 0))} | {thread} | "
                         f"{parts.get('trace', 0):.3f} | {parts.get('lower', 0):.3f} | "
                         f"{parts.get('compile', 0):.3f} |")
        lines.append(f"\ncache reads: {best['cache_read_s']:.2f} s; class-IL "
                     f"{100 * best['class_il']:.2f}%\n")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:6])
        return
    from absl import app, flags

    flags.DEFINE_string("data_dir", os.environ.get("ESACL_DATA_DIR"), "Directory with mnist/.")
    flags.DEFINE_list("methods", ["derpp", "esacl"], "split_mnist protocol rows to profile.")
    flags.DEFINE_integer("repeats", 3, "Fresh processes per (method, cold/warm); best is shown.")
    flags.DEFINE_string("out", None, "Also write the markdown report here.")

    def run(argv):
        del argv
        f = flags.FLAGS
        if not f.data_dir:
            raise app.UsageError("--data_dir (or $ESACL_DATA_DIR) is required")
        rows: dict[tuple[str, str], list[dict]] = {}
        with tempfile.TemporaryDirectory() as cache:
            for method in f.methods:
                _measure(method, f.data_dir, cache)  # fills the cache (untimed)
            for _ in range(f.repeats):  # interleaved: method x cold/warm in each round
                for method in f.methods:
                    for label, cache_dir in (("cold", None), ("warm cache", cache)):
                        rows.setdefault((method, label), []).append(
                            _measure(method, f.data_dir, cache_dir))
        from esacl_jax.harness.results import GIT_DIRTY  # after the measured children

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(GIT_DIRTY, cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        head = (f"# Start-up profile (split_mnist)\n\n- command: `python -m "
                f"experiments.bench.profile_startup {_portable(' '.join(sys.argv[1:]))}`\n"
                f"- commit: {commit}"
                f"{'-dirty' if dirty else ''}\n- machine: {os.cpu_count()} CPUs, "
                f"{sys.platform}\n")
        text = head + "\n" + _report(rows)
        print(text)
        if f.out:
            pathlib.Path(f.out).write_text(text + "\n")

    app.run(run)


def _portable(command: str) -> str:
    """The command as a report records it: absolute directories as placeholders."""
    from esacl_jax.harness.sweep.provenance import portable_command

    return portable_command(command)


if __name__ == "__main__":
    main()
