"""Running one run of a sweep in this process: `execute`, shared by every launcher.

`execute.run_all` calls it in this process or its worker processes, the Ray launcher inside
each Ray task (`ray_launcher`), so neither launcher imports the other.
"""

from __future__ import annotations

import pathlib
import socket
import time
from collections.abc import Mapping, Sequence

from esacl_jax.harness.sweep.plan import Outcome, Run, build_config, one_line


def execute(run: Run, data_dir: str | None = None, node: Mapping | None = None) -> Outcome:
    """Builds the run's config and trains it; any exception becomes a "failed" outcome.

    A finished run's results.json gets a ``"node"`` record saying where it ran: `node` (the Ray
    launcher's: host, ip, Ray node id, attempts) or, by default, ``{"launcher": "local",
    "hostname": ...}``.
    """
    import jax

    from esacl_jax.harness.atomic_io import write_json_atomic
    from esacl_jax.harness.loop import train_and_evaluate

    start = time.perf_counter()
    node = {"launcher": "local", "hostname": socket.gethostname()} if node is None \
        else dict(node)
    try:
        config = build_config(run, data_dir)
        result = train_and_evaluate(config, run.workdir, progress=False)
        if run.seeds:  # a seed group: each seed's results.json in workdir/seed<N>
            for seed, one in zip(run.seeds, result["runs"], strict=True):
                one["node"] = node
                write_json_atomic(pathlib.Path(run.workdir) / f"seed{seed}" / "results.json",
                                  one)
            result = {"metrics": _mean_metrics([one["metrics"] for one in result["runs"]]),
                      "wall_time_s": result["runs"][0]["wall_time_s"]}
        else:
            result["node"] = node
            write_json_atomic(run.results_path, result)
        return Outcome.from_metrics(
            run, "done", result["metrics"],
            float(result.get("wall_time_s", time.perf_counter() - start)), node)
    except Exception as err:  # noqa: BLE001 - one bad run must not stop the sweep
        return Outcome(run, "failed", wall_time_s=time.perf_counter() - start,
                       error=one_line(err))
    finally:
        jax.clear_caches()  # compiled functions of this run's shapes are not needed again


def _mean_metrics(metrics: Sequence[Mapping]) -> dict:
    """The mean average accuracies of a seed group's runs (what its progress line shows)."""
    out = {}
    for setting in ("class_il", "task_il"):
        values = [m[setting]["average_accuracy"] for m in metrics]
        out[setting] = {"average_accuracy": sum(values) / len(values)}
    return out
