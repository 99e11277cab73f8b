"""Whether a stored results.json can stand in for a planned run: same config, or not reused.

A stored run is reused only when its config equals the planned one by the rule every run uses
(`esacl_jax.harness.config_diff.config_differences`, also deciding whether a single run may reuse
its workdir).
"""

from __future__ import annotations

import json

from esacl_jax.harness.config_diff import config_differences
from esacl_jax.harness.sweep.plan import Outcome, Run, build_config, one_line, plain_config

__all__ = ["check_existing", "config_differences"]


def check_existing(run: Run, data_dir: str | None) -> Outcome:
    """A skip for a results.json made by the same config, else a failure saying what differs."""
    try:
        stored = json.loads(run.results_path.read_text(encoding="utf-8"))
        planned = plain_config(build_config(run, data_dir))
    except Exception as err:  # noqa: BLE001 - reported as this run's failure
        return Outcome(run, "failed", error=f"cannot reuse {run.results_path}: {one_line(err)}")
    diffs = config_differences(planned, stored.get("config") or {})
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; +{len(diffs) - 4} more" if len(diffs) > 4 else "")
        return Outcome(run, "failed", error=f"{run.results_path} was made with another config "
                       f"({shown}): pass --force to redo it or choose another --out")
    return Outcome.from_metrics(run, "skipped", stored.get("metrics") or {},
                                stored.get("wall_time_s"), stored.get("node"))
