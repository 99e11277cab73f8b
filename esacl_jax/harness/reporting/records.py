"""Per-run records: the few KB of one run that every report table and plot is rebuilt from.

A sweep writes, beside its report, one ``records.jsonl`` per study: one JSON object per run and
line, in a stable order (benchmark, method, label, sparsity, buffer, seed, path), keys sorted,
floats at full precision (JSON round-trips them exactly). A record holds no per-step log, no
host name and no absolute path. `load_records` turns a records file back into the dicts
`load_runs` returns for results.json files, so every table, paired table, paper table and plot
of `esacl_jax.harness.reporting` is built from either alike.

Record fields (`RECORD_VERSION` 1):

- ``record``: the format version; ``path``: the run's results.json relative to the study's
  folder (POSIX; what tables list and what paired groups are made of);
- ``benchmark`` (the protocol row, e.g. split_mnist_w400, as tables name it), ``protocol``,
  ``data_benchmark`` (the dataset), ``method``, ``label`` (method plus its non-default knobs),
  ``seed``, ``sparsity``, ``buffer``, ``sparse_start`` (of a sparse run; None for dense ones);
- ``config``: every field that differs from the protocol's default config for the method
  (``get_config(protocol, method)`` at the commit that wrote the record), flat and dotted;
  fields that do not change the computation (data location, progress output...) left out;
- ``commit``, ``split`` ("test" or "validation");
- ``class_il_matrix``, ``task_il_matrix``, ``metrics`` (per setting: average and learning
  accuracy, forgetting, backward and forward transfer);
- ``training_flops``, ``weights`` (nonzero, total, sparsity over all weights), ``memory``
  (``measured`` peaks, ``analytic`` footprint parts, ``method_state_counted``),
  ``sparse_export_bytes``, ``wall_time_s``;
- ``environment``: platform, cpu_count, backend, jax (the version).

The label, sparsity, buffer and benchmark of a loaded record are the recorded ones (under the
run dict's ``"recorded"`` key, which the `collect` accessors read first), so a table rebuilt
later names the runs as the sweep did, whatever later versions change in the defaults.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from esacl_jax.harness.atomic_io import write_text_atomic
from esacl_jax.harness.reporting.collect import (
    _config,
    _get,
    benchmark_of,
    buffer_of,
    commit_of,
    method_label,
    method_of,
    seed_of,
    sparse_start_label,
    sparsity_of,
)

__all__ = ["RECORD_VERSION", "RECORDS_FILE", "RecordsError", "config_overrides", "load_records",
           "records_text", "to_record", "to_run", "write_records"]

RECORD_VERSION = 1
RECORDS_FILE = "records.jsonl"
_METRIC_KEYS = ("average_accuracy", "learning_accuracy", "forgetting", "backward_transfer",
                "forward_transfer")
_WEIGHT_KEYS = ("nonzero", "total", "sparsity")
_MEMORY_KEYS = ("measured", "analytic", "method_state_counted")
_ENVIRONMENT_KEYS = ("platform", "cpu_count", "backend")
# What the record holds in its own fields (never repeated in ``config``).
_IDENTITY_FIELDS = ("protocol", "benchmark", "method", "seed")
_REQUIRED = ("record", "path", "benchmark", "method", "label", "seed", "sparsity", "config",
             "class_il_matrix", "metrics")


class RecordsError(ValueError):
    """A records file that cannot be read; the message is one line naming the file."""


def _flat_differences(config: Mapping, default: Any, prefix: str = "") -> dict[str, Any]:
    from esacl_jax.harness.config import NON_COMPUTATIONAL_FIELDS

    out: dict[str, Any] = {}
    default = default if isinstance(default, Mapping) else {}
    for key in sorted(config):
        if not prefix and (key in NON_COMPUTATIONAL_FIELDS or key in _IDENTITY_FIELDS):
            continue
        value, name = config[key], f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_differences(value, default.get(key), f"{name}."))
        elif key not in default or default[key] != value:
            out[name] = value
    return out


def config_overrides(config: Mapping) -> dict[str, Any]:
    """The fields of a stored config that differ from its protocol's default for its method.

    Args:
      config: ``results.json["config"]``.

    Returns:
      A flat dict, dotted keys (``"esacl.gamma"``), sorted; the whole config (less the
      non-computational fields) when this version does not know the protocol or method.
    """
    from esacl_jax.harness.config import get_config
    from esacl_jax.harness.config_diff import plain_config

    protocol = config.get("protocol") or config.get("benchmark")
    try:
        default = plain_config(get_config(str(protocol), str(config.get("method"))))
    except (ValueError, KeyError):
        default = {}
    return _flat_differences(config, default)


def _subset(mapping: Any, keys: Iterable[str]) -> dict[str, Any] | None:
    if not isinstance(mapping, Mapping):
        return None
    return {k: mapping[k] for k in keys if k in mapping}


def to_record(result: dict, relative_path: str) -> dict[str, Any]:
    """The record of one run.

    Args:
      result: a results.json dict (as `load_runs` returns it).
      relative_path: its results.json's path relative to the study's folder (POSIX).

    Returns:
      The record (see the module docstring).
    """
    config = _config(result)
    metrics = result.get("metrics") if isinstance(result.get("metrics"), Mapping) else {}
    environment = result.get("environment") if isinstance(result.get("environment"),
                                                          Mapping) else {}
    return {
        "record": RECORD_VERSION,
        "path": relative_path,
        "benchmark": benchmark_of(result),
        "protocol": config.get("protocol") or None,
        "data_benchmark": str(config.get("benchmark") or benchmark_of(result)),
        "method": method_of(result),
        "label": method_label(result),
        "seed": seed_of(result),
        "sparsity": sparsity_of(result),
        "buffer": buffer_of(result),
        "sparse_start": sparse_start_label(result) if sparsity_of(result) > 0 else None,
        "config": config_overrides(config),
        "commit": commit_of(result),
        "split": "validation" if (config.get("validation_fraction") or 0) > 0 else "test",
        "class_il_matrix": result.get("class_il_matrix"),
        "task_il_matrix": result.get("task_il_matrix"),
        "metrics": {name: _subset(m, _METRIC_KEYS) for name, m in sorted(metrics.items())
                    if isinstance(m, Mapping)},
        "training_flops": result.get("training_flops"),
        "weights": _subset(result.get("weights"), _WEIGHT_KEYS),
        "memory": _subset(result.get("memory"), _MEMORY_KEYS),
        "sparse_export_bytes": _get(result, "sparse_export", "bytes"),
        "wall_time_s": result.get("wall_time_s"),
        "environment": {**(_subset(environment, _ENVIRONMENT_KEYS) or {}),
                        "jax": _get(environment, "packages", "jax")},
    }


def _order(record: Mapping) -> tuple:
    buffer, seed = record.get("buffer"), record.get("seed")
    return (str(record["benchmark"]), str(record["method"]), str(record["label"]),
            float(record["sparsity"]), -1 if buffer is None else buffer,
            -1 if seed is None else seed, str(record["path"]))


def records_text(records: Iterable[Mapping]) -> str:
    """Records as JSON Lines: sorted (`_order`), keys sorted, compact, one per line."""
    return "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n"
                   for r in sorted(records, key=_order))


def write_records(results: Sequence[dict], root: str | os.PathLike,
                  path: str | os.PathLike | None = None) -> pathlib.Path:
    """Writes the records of `results` (results.json dicts with their ``"path"``), atomically.

    Args:
      results: the study's runs, each with the path of its results.json under ``"path"``.
      root: the study's folder; record paths are relative to it.
      path: the records file (default: ``root/records.jsonl``).

    Returns:
      The records file's path.
    """
    root = pathlib.Path(root)
    path = pathlib.Path(path) if path is not None else root / RECORDS_FILE
    base = root.resolve()
    records = []
    for result in results:
        rel = os.path.relpath(pathlib.Path(result["path"]).resolve(), base)
        records.append(to_record(result, pathlib.PurePath(rel).as_posix()))
    write_text_atomic(path, records_text(records))
    return path


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def to_run(record: Mapping[str, Any], root: str | os.PathLike) -> dict[str, Any]:
    """The results.json-shaped dict of a record, as `load_runs` returns it (with ``"path"``
    under `root` and ``"relative_path"``), its label, sparsity, buffer and benchmark as
    recorded (``"recorded"``).

    Args:
      record: one record.
      root: the folder its ``path`` is relative to (the records file's).

    Returns:
      The run dict.
    """
    config = _nested(record["config"])
    config.update(protocol=record.get("protocol") or "", method=record["method"],
                  benchmark=record.get("data_benchmark") or record["benchmark"],
                  seed=record["seed"])
    environment = dict(record.get("environment") or {})
    run: dict[str, Any] = {
        "method": record["method"], "seed": record["seed"], "config": config,
        "benchmark": {"name": config["benchmark"]},
        "recorded": {k: record.get(k) for k in ("benchmark", "label", "sparsity", "buffer")},
        "environment": {"git_commit": record.get("commit"),
                        "packages": {"jax": environment.pop("jax", None)}, **environment},
        "path": str(pathlib.Path(root) / record["path"]),
        "relative_path": record["path"],
    }
    for key in ("class_il_matrix", "task_il_matrix", "metrics", "training_flops", "weights",
                "memory", "wall_time_s"):
        if record.get(key) is not None:
            run[key] = record[key]
    if record.get("sparse_export_bytes") is not None:
        run["sparse_export"] = {"bytes": record["sparse_export_bytes"]}
    return run


def _parse(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as err:
        raise RecordsError(f"{where}: not JSON ({err})") from None
    if not isinstance(record, dict):
        raise RecordsError(f"{where}: a record is a JSON object")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise RecordsError(f"{where}: not a run record (no {', '.join(missing)})")
    if record["record"] != RECORD_VERSION:
        raise RecordsError(f"{where}: record version {record['record']!r}, this version reads "
                           f"{RECORD_VERSION}")
    return record


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The runs of a records file, as `load_runs` returns results.json files: sorted by path,
    ``"path"`` under the records file's folder.

    Args:
      path: a records.jsonl file.

    Returns:
      One run dict per record (`to_run`).

    Raises:
      RecordsError: the file is missing, unreadable, or a line is not a record (one line
        naming the file and line).
    """
    path = pathlib.Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RecordsError(f"cannot read {path}: {err}") from None
    records = [_parse(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
    runs = [to_run(r, path.parent) for r in records]
    return sorted(runs, key=lambda r: pathlib.PurePosixPath(r["relative_path"]))
