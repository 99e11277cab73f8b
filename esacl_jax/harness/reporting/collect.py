"""Loading results.json files and reading one run's facts from them.

Every accessor takes one results.json dict and tolerates missing keys: a statistic the file
does not record reads as None. Facts about a method (its sparsity field, whether it uses the
replay buffer) come from the method registry (`esacl_jax.harness.methods`); a method the
registry does not know (e.g. in a results.json of a method since removed) counts as dense.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Method -> (config sub-dict, {knob: default}). A knob whose value differs from its default
# goes into the label, so variants/ablations form their own rows. Keep in sync with
# esacl_jax.harness.config.base_config (tests/test_reporting.py checks it).
VARIANT_KNOBS: dict[str, tuple[str, dict[str, Any]]] = {
    "esacl": ("esacl", {"step_variant": "C", "gamma": 0.25, "rho": 0.01, "sdp": True,
                        "replay": "derpp", "ids_score": "sharpness", "replay_at": "perturbed",
                        "mask_update_every_steps": 0,
                        "ids_unseen": "mean", "dense_to_sparse": False}),
    "sparcl": ("sparcl", {"base": "derpp", "ddr": True, "dgm": True}),
    "sparcl_ewc": ("sparcl", {"ddr": True, "dgm": True}),
    "sparcl_er": ("sparcl", {"ddr": True, "dgm": True}),
    "sparcl_derpp": ("sparcl", {"ddr": True, "dgm": True}),
    "sparcl_co2l": ("sparcl", {"ddr": True, "dgm": True}),
}
# Knobs whose value alone is clear enough in a label ("esacl[C]" rather than "step_variant=C").
_BARE_KNOBS = {"step_variant"}


def _results_files(root: pathlib.Path) -> list[pathlib.Path]:
    """results.json files under `root`, following symlinked directories (a directory of links
    to several sweeps' outputs reports them together), each real directory visited once."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link cycle, or a second link to the same directory
            dirnames[:] = []
            continue
        seen.add(real)
        if "results.json" in filenames:
            found.append(pathlib.Path(dirpath) / "results.json")
    return sorted(found)


def load_runs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every readable results.json under `root` (recursive, symlinked directories followed),
    sorted by path.

    Each dict gets a ``"path"`` key (the file's path as a string) and a ``"relative_path"`` key
    (the same path relative to `root`, POSIX style: what tables write, so that a committed table
    names its runs without a machine's absolute paths). Files that cannot be read,
    are not JSON, or lack the keys of a results.json are skipped with a logged warning: one bad
    file never hides the others.
    """
    runs = []
    root = pathlib.Path(root)
    if not root.is_dir():
        return runs
    for path in _results_files(root):
        try:
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            log.warning("skipping unreadable %s: %s", path, err)
            continue
        if not isinstance(result, dict) or "method" not in result or "metrics" not in result:
            log.warning("skipping %s: not a results.json (no 'method'/'metrics')", path)
            continue
        result["path"] = str(path)
        result["relative_path"] = path.relative_to(root).as_posix()
        runs.append(result)
    return runs


# --------------------------------------------------------------------------------------------
# The method registry, for method names it knows


@functools.cache
def _sparsity_key(method: str) -> str | None:
    """The method's dotted sparsity field; None for dense and unregistered methods."""
    from esacl_jax.harness.methods import registry

    return registry.known_sparsity_key(method)


@functools.cache
def _uses_buffer(method: str) -> bool | None:
    """Whether the method trains with the replay buffer; None for unregistered methods."""
    from esacl_jax.harness.methods import registry

    return registry.uses_buffer(method) if method in registry.METHODS else None


# --------------------------------------------------------------------------------------------
# Accessors


def _config(result: dict) -> dict:
    config = result.get("config")
    return config if isinstance(config, dict) else {}


def _get(mapping: Any, *keys: str) -> Any:
    """mapping[k0][k1]... or None where any level is missing or not a dict."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# A run loaded from a record (`records.load_records`) carries the facts the sweep recorded under
# this key; the accessors below return those before deriving them from the config.
RECORDED = "recorded"


def _recorded(result: dict, name: str) -> tuple[bool, Any]:
    """(True, value) when `result` is a loaded record holding `name`, else (False, None)."""
    recorded = result.get(RECORDED)
    if isinstance(recorded, dict) and name in recorded:
        return True, recorded[name]
    return False, None


def benchmark_of(result: dict) -> str:
    """The benchmark's name (results.json stores a dict; hand-made files may hold a string)."""
    found, value = _recorded(result, "benchmark")
    if found:
        return str(value)
    protocol = _config(result).get("protocol")
    if protocol:  # the protocol row (e.g. split_mnist_w400), finer than the dataset benchmark
        return str(protocol)
    bench = result.get("benchmark")
    if isinstance(bench, dict):
        bench = bench.get("name")
    if not bench:
        bench = _config(result).get("benchmark")
    return str(bench) if bench else "unknown"


def method_of(result: dict) -> str:
    """The run's method name."""
    return str(result.get("method") or _config(result).get("method") or "unknown")


def method_family(method: str) -> str:
    """The family a method belongs to in plots (all SparCL bases share one marker)."""
    return "sparcl" if method.startswith("sparcl") else method


def seed_of(result: dict) -> int | None:
    seed = result.get("seed", _config(result).get("seed"))
    return int(seed) if isinstance(seed, (int, float)) else None


def commit_of(result: dict) -> str | None:
    """The git commit the run was made at, as recorded in its environment."""
    commit = _get(result, "environment", "git_commit")
    return str(commit) if commit else None


def sparsity_of(result: dict) -> float:
    """Target sparsity from the method's sparsity field; 0.0 for dense methods."""
    found, value = _recorded(result, "sparsity")
    if found:
        return float(value)
    key = _sparsity_key(method_of(result))
    if key is None:
        return 0.0
    return _finite(_get(_config(result), *key.split("."))) or 0.0


def buffer_of(result: dict) -> int | None:
    """Replay-buffer size, or None for methods that use no buffer."""
    found, value = _recorded(result, "buffer")
    if found:
        return None if value is None else int(value)
    method, config = method_of(result), _config(result)
    if _uses_buffer(method) is False:
        return None
    if method == "esacl" and _get(config, "esacl", "replay") == "none":
        return None
    if method == "sparcl" and _get(config, "sparcl", "base") == "ewc":
        return None
    size = config.get("buffer_size")
    return int(size) if isinstance(size, (int, float)) else None


def _format_knob(name: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return text if name in _BARE_KNOBS else f"{name}={text}"


def _differs(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return value != default
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return not math.isclose(value, default, rel_tol=1e-9, abs_tol=1e-12)
    return value != default


def method_label(result: dict) -> str:
    """Method name plus its non-default variant knobs, e.g. ``esacl[C,gamma=1,sdp=off]``, and
    any architecture field set away from the protocol's (``derpp[mlp_widths=62-62]``).

    Knobs and defaults are listed in `VARIANT_KNOBS`; a knob missing from the config counts as
    its default. Knobs appear in `VARIANT_KNOBS` order, then a sparse method's start when it is
    not "magnitude" (``sparse_start=rescaled``), then the architecture fields.
    """
    found, value = _recorded(result, "label")
    if found:
        return str(value)
    method = method_of(result)
    parts = []
    if method in VARIANT_KNOBS:
        section, defaults = VARIANT_KNOBS[method]
        sub = _get(_config(result), section) or {}
        parts = [_format_knob(name, sub[name]) for name, default in defaults.items()
                 if name in sub and _differs(sub[name], default)]
    start = sparse_start_label(result)
    if start and _sparsity_key(method) is not None and start != "magnitude":
        parts.append(f"sparse_start={start}")
    parts += _architecture_knobs(result)
    return f"{method}[{','.join(parts)}]" if parts else method


def sparse_start_label(result: dict) -> str | None:
    """The sparse start a run's config asks for (`config.sparse_start_of`: a config from before
    `sparse_start` existed ran EsaCL's ``esacl.init_rescale``); None when the config records
    neither (a hand-made results.json).

    Args:
      result: one results.json dict.

    Returns:
      "magnitude", "rescaled", the recorded value when it is not one of those, or None.
    """
    from esacl_jax.harness.config import sparse_start_of

    config = _config(result)
    if "sparse_start" not in config and not isinstance(config.get("esacl"), dict):
        return None
    try:
        return sparse_start_of({**config, "method": method_of(result)})
    except ValueError:
        return str(config.get("sparse_start"))


# Config fields that change the network; a run that sets them away from its protocol's values
# (e.g. --set=mlp_widths=[62,62]) gets its own row instead of merging with the protocol's.
ARCHITECTURE_FIELDS = ("model", "mlp_widths", "resnet_nf")


@functools.cache
def _architecture_defaults(protocol: str, method: str) -> dict[str, Any]:
    """The protocol's `ARCHITECTURE_FIELDS` for `method` (empty when this version does not know
    the protocol or method); cached, since labels are asked for per run and per table."""
    from esacl_jax.harness.config import get_config

    try:
        config = get_config(protocol, method)
    except (ValueError, KeyError):
        return {}
    return {name: config.get(name) for name in ARCHITECTURE_FIELDS}


def _architecture_knobs(result: dict) -> list[str]:
    """``mlp_widths=62-62``-style parts for the fields that differ from the run's protocol."""
    config = _config(result)
    protocol = config.get("protocol")
    if not protocol:
        return []
    defaults = _architecture_defaults(str(protocol), str(config.get("method") or "finetune"))
    parts = []
    for name in ARCHITECTURE_FIELDS:
        value, default = config.get(name), defaults.get(name)
        if value is None or default is None:
            continue
        if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
            if list(value) != list(default):
                parts.append(f"{name}={'-'.join(str(v) for v in value)}")
        elif _differs(value, default):
            parts.append(_format_knob(name, value))
    return parts


def run_key(result: dict) -> tuple[str, str, float, int | None]:
    """The group a run belongs to: (benchmark, label, sparsity, buffer)."""
    return benchmark_of(result), method_label(result), sparsity_of(result), buffer_of(result)


def peak_memory_of(result: dict) -> float | None:
    """Measured peak memory in bytes: the device allocator's peak, else the host's peak RSS."""
    measured = _get(result, "memory", "measured")
    device = _finite(_get(measured, "device_peak_bytes"))
    return device if device is not None else _finite(_get(measured, "host_peak_rss_bytes"))


def _percent(value: Any) -> float | None:
    value = _finite(value)
    return None if value is None else 100.0 * value


# Row statistic -> how to read it from one result (None when absent). Units: accuracies and
# forgetting in percent, FLOPs in FLOPs, memory in bytes, time in seconds.
METRICS: dict[str, Callable[[dict], float | None]] = {
    "class_il": lambda r: _percent(_get(r, "metrics", "class_il", "average_accuracy")),
    "task_il": lambda r: _percent(_get(r, "metrics", "task_il", "average_accuracy")),
    "forgetting": lambda r: _percent(_get(r, "metrics", "class_il", "forgetting")),
    "training_flops": lambda r: _finite(r.get("training_flops")),
    "peak_memory_bytes": peak_memory_of,
    "analytic_memory_bytes": lambda r: _finite(_get(r, "memory", "analytic", "total")),
    "wall_time_s": lambda r: _finite(r.get("wall_time_s")),
    # Over ALL parameters (every kernel, bias and norm scale), beside the prunable-set sparsity.
    "sparsity_all": lambda r: _percent(_get(r, "weights", "sparsity")),
    "nonzero_weights": lambda r: _finite(_get(r, "weights", "nonzero")),
}
