"""What a sweep is made of: `Run` (one planned experiment), its `Outcome`, and its config.

A run's config is its benchmark's protocol row (`experiments/configs/<benchmark>.py`,
``get_config(method)``) with dotted overrides (``{"esacl.gamma": 1.0}``) and the seed applied.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from esacl_jax.harness.config_diff import plain_config as plain_config  # re-exported


@dataclasses.dataclass(frozen=True)
class Run:
    """One experiment of a sweep.

    Attributes:
      benchmark: config module name under experiments/configs (``split_mnist``).
      method: the protocol row passed to its ``get_config`` (``esacl``).
      overrides: config fields to set afterwards; dotted keys reach sub-dicts
        (``{"esacl.gamma": 1.0}``). Unknown fields are an error, never silently added.
      seed: ``config.seed``.
      workdir: where results.json is written.
      group: the table row the run belongs to (e.g. an ablation variant); free text.
      seeds: a seed group (`execute.group_seeds`): these seeds trained as one program
        (``config.seeds``), each writing ``workdir/seed<N>/results.json``; empty: one run.
    """

    benchmark: str
    method: str
    overrides: Mapping[str, Any]
    seed: int
    workdir: pathlib.Path
    group: str = ""
    seeds: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        """A short unique label for progress lines: ``split_mnist/esacl/s0.9/seed0``."""
        sparsity = next((v for k, v in self.overrides.items() if k.endswith(".sparsity")), None)
        parts = [self.benchmark, self.group or self.method]
        if sparsity is not None:
            parts.append(f"s{sparsity:g}")
        parts.append(f"seeds{','.join(map(str, self.seeds))}" if self.seeds
                     else f"seed{self.seed}")
        return "/".join(parts)

    @property
    def results_path(self) -> pathlib.Path:
        return pathlib.Path(self.workdir) / "results.json"


def accuracy(metrics: Mapping, setting: str) -> float | None:
    """``metrics[setting]["average_accuracy"]`` of a results.json, in [0, 1]; None if absent."""
    value = (metrics.get(setting) or {}).get("average_accuracy")
    return float(value) if isinstance(value, (int, float)) else None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened to one run: ``status`` is "done", "skipped" or "failed".

    ``node`` says where it ran (``host (ip)``, from results.json's ``node`` record; empty when
    unknown); ``attempts`` counts the Ray launcher's tries (more than 1: its worker process died
    and Ray retried it).
    """

    run: Run
    status: str
    class_il: float | None = None  # average accuracy in [0, 1]
    task_il: float | None = None
    wall_time_s: float | None = None
    error: str = ""
    node: str = ""
    attempts: int = 1

    @classmethod
    def from_metrics(cls, run: Run, status: str, metrics: Mapping,
                     wall_time_s: float | None, node: Mapping | None = None) -> Outcome:
        """A done/skipped outcome with the accuracies of a results.json's ``metrics`` and where
        it ran (its ``node`` record)."""
        return cls(run, status, class_il=accuracy(metrics, "class_il"),
                   task_il=accuracy(metrics, "task_il"), wall_time_s=wall_time_s,
                   node=describe_node(node))


def describe_node(node: Mapping | None) -> str:
    """A results.json ``node`` record as ``host (ip)`` (``host`` without an ip); "" for none."""
    if not isinstance(node, Mapping) or not node.get("hostname"):
        return ""
    return f"{node['hostname']} ({node['ip']})" if node.get("ip") else str(node["hostname"])


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """All outcomes of `run_all`, in the order of the run list."""

    outcomes: tuple[Outcome, ...]
    wall_time_s: float

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    @property
    def usable_runs(self) -> list[Run]:
        """Runs whose results.json belongs to the planned config (done now or skipped)."""
        return [o.run for o in self.outcomes if o.status in ("done", "skipped")]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def one_line(err: BaseException) -> str:
    """An exception as one line: ``TypeName: message`` with the message's whitespace folded."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --------------------------------------------------------------------------------------------
# Configs


def available_benchmarks() -> list[str]:
    """The protocol names (`esacl_jax.harness.config.BENCHMARK_PROTOCOLS`)."""
    from esacl_jax.harness.config import BENCHMARK_PROTOCOLS

    return sorted(BENCHMARK_PROTOCOLS)


def protocol_config(benchmark: str, method: str) -> ml_collections.ConfigDict:
    """The protocol's config with the method's row; ValueError naming the known ones."""
    from esacl_jax.harness.config import get_config

    return get_config(benchmark, method)


def check_benchmark(benchmark: str) -> None:
    """ValueError for an unknown protocol name."""
    known = available_benchmarks()
    if benchmark not in known:
        raise ValueError(f"no protocol {benchmark!r}; choose from {', '.join(known)}")


def parse_value(text: str) -> Any:
    """A Python literal (``0.5``, ``False``, ``(100, 100)``) or else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["esacl.rho=0.1", "model=resnet18"]`` -> ``{"esacl.rho": 0.1, "model": "resnet18"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. esacl.rho=0.1)")
        out[key.strip()] = parse_value(value.strip())
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Sets dotted fields in place. Missing fields and type mismatches raise with the key named."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise KeyError(f"override {dotted!r}: config has no section {part!r}")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"override {dotted!r}: config has no field {leaf!r}")
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as err:
            raise TypeError(f"override {dotted}={value!r}: {err}") from err


def build_config(run: Run, data_dir: str | None = None) -> ml_collections.ConfigDict:
    """The run's protocol row + overrides + seed, with progress bars and TensorBoard off."""
    config = protocol_config(run.benchmark, run.method)
    apply_overrides(config, run.overrides)
    config.seed = run.seed
    if run.seeds:
        config.seeds = ",".join(str(seed) for seed in run.seeds)
    config.progress = False
    config.tensorboard = False
    if data_dir:
        config.data_dir = str(data_dir)
    return config
