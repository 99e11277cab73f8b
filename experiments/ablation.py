"""EsaCL ablation: which part of the method buys what (`make ablation ARGS=...`).

Rows (``--variants``, comma-separated names; default all):
  esacl               EsaCL's default: step variant C, rho 0.01, gamma 0.25 (chosen on this
                      ablation's validation split), the magnitude-pruned start
  rescaled_start      the default with each unit's kept weights rescaled to its dense norm
                      (sparse_start=rescaled)
  gamma_half          the published default with gamma 0.5
  variant_b           METHOD.md's reference step: variant B, SDP, IDS gamma 0.5, rho 0.05,
                      plain magnitude-pruned init; the rows below change one knob of it
  variant_a           step variant A (clean pass on current + replay)
  variant_c           step variant C (ascent on the top-gamma of a per-example score table)
  no_sdp              esacl.sdp=False: magnitude masks fixed at initialisation
  no_ids              esacl.gamma=1.0: every current example kept
  no_sam              esacl.rho=0.0: no perturbation (the sharpness scores are then all zero)
  ids_perturbed_loss  esacl.ids_score=perturbed_loss
  ids_clean_loss      esacl.ids_score=clean_loss
  ids_random          esacl.ids_score=random: a random subset of the same size (IDS's control)
  c_ids_random        the published default with esacl.ids_score=random (same cost)
  c_ids_random_half   gamma 0.5 with a random subset of the same size (gamma_half's control)
  c_gamma_1           the published default with gamma 1.0 (ascent on the whole batch)
  c_no_sdp            the published default with masks fixed at initialisation
  c_no_sam            the published default with rho 0 (no ascent)
  c_erk               the published default with ERK layer sparsities
  c_input_dense       the published default with the first layer dense (SparCL's prunable set)
  dense_to_sparse     the published default, dense-to-sparse (cubic ramp over the first task)
  sparcl_derpp        SparCL-DER++ at the same sparsity
  derpp               dense DER++, the reference row of every table

Every sparse row runs at each of --sparsities (esacl.sparsity); DER++ runs once per benchmark
and seed. The ablation picks defaults, so by default it evaluates on a held-out 10% of each
task's training set (--validation_fraction), never on the test set.

Full ablation (2 benchmarks x (21 sparse rows x 3 sparsities + DER++) x 3 seeds = 384 runs):
  python -m experiments.ablation --data_dir=DATA --jobs=2
Quick smoke run:
  python -m experiments.ablation --benchmarks=split_digits --seeds=0 --sparsities=0.9 \
      --variants=esacl,no_sdp,derpp --epochs=1 --out=/tmp/ablation_smoke

Writes <out>/ablation.md (one table per benchmark and sparsity) and <out>/ablation.csv, each
headed by the command line, git commit, machine and evaluation split, and <out>/records.jsonl
(one record per run: `python -m experiments.report --records=...` rebuilds tables from it).
Runs already done are skipped (--force redoes them); the exit status is 1 when any run failed.
--launcher=ray runs each run as a Ray task, on a local Ray instance or a cluster
(--ray_address; docs/sweeps.md).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import pathlib
from collections.abc import Sequence
from typing import Any, ClassVar

from experiments import early_signals

# Before the imports below (seconds): Ctrl-C meanwhile stops the sweep cleanly.
_EARLY = early_signals.install_if_main(__name__)

from esacl_jax.harness import sweep  # noqa: E402
from esacl_jax.harness.atomic_io import write_text_atomic  # noqa: E402
from esacl_jax.harness.methods import sparsity_key  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ablation row: a readable name, the protocol row it starts from, its overrides."""

    title: str
    method: str
    overrides: dict[str, Any]
    sparse: bool = True


# Every row but the published default spells out its knobs relative to METHOD.md's reference
# step (variant B, rho 0.05), so the table does not change meaning when the defaults do.
_REFERENCE = {"esacl.step_variant": "B", "esacl.rho": 0.05, "esacl.gamma": 0.5,
              "sparse_start": "magnitude"}
VARIANTS: dict[str, Variant] = {
    "esacl": Variant("EsaCL (default: C, rho 0.01, gamma 0.25, magnitude-pruned start)", "esacl",
                     {}),
    "rescaled_start": Variant("default, kept weights rescaled to each unit's dense norm",
                              "esacl", {"sparse_start": "rescaled"}),
    "gamma_half": Variant("published default with gamma 0.5", "esacl", {"esacl.gamma": 0.5}),
    "variant_b": Variant("variant B (METHOD.md reference, rho 0.05)", "esacl", _REFERENCE),
    "variant_a": Variant("variant A", "esacl", {**_REFERENCE, "esacl.step_variant": "A"}),
    "variant_c": Variant("variant C (rho 0.05)", "esacl",
                         {**_REFERENCE, "esacl.step_variant": "C"}),
    "no_sdp": Variant("B, no SDP (masks fixed at init)", "esacl",
                      {**_REFERENCE, "esacl.sdp": False}),
    "no_ids": Variant("B, no IDS (gamma=1)", "esacl", {**_REFERENCE, "esacl.gamma": 1.0}),
    "no_sam": Variant("B, no SAM (rho=0)", "esacl", {**_REFERENCE, "esacl.rho": 0.0}),
    "ids_perturbed_loss": Variant("B, IDS score=perturbed_loss", "esacl",
                                  {**_REFERENCE, "esacl.ids_score": "perturbed_loss"}),
    "ids_clean_loss": Variant("B, IDS score=clean_loss", "esacl",
                              {**_REFERENCE, "esacl.ids_score": "clean_loss"}),
    "ids_random": Variant("B, IDS score=random (a random subset of the same size)", "esacl",
                          {**_REFERENCE, "esacl.ids_score": "random"}),
    # Controls of the published default (step C), one knob each: what IDS, SDP and SAM buy
    # where they act (the multi-epoch protocols), and the dense-to-sparse reading of SDP.
    "c_ids_random": Variant("default, IDS score=random (same cost)", "esacl",
                            {"esacl.ids_score": "random"}),
    # IDS's data efficiency: the ascent on gamma = 0.25 (default), 0.5 and 1.0 of the batch,
    # each against a random subset of the same size (gamma 0.5 is `gamma_half`; at gamma 1 both
    # are the whole batch).
    "c_ids_random_half": Variant("default with gamma 0.5, IDS score=random (same cost)", "esacl",
                                 {"esacl.gamma": 0.5, "esacl.ids_score": "random"}),
    "c_gamma_1": Variant("default with gamma 1 (ascent on the whole batch: no selection)",
                         "esacl", {"esacl.gamma": 1.0}),
    "c_no_sdp": Variant("default, no SDP (masks fixed at init)", "esacl", {"esacl.sdp": False}),
    "c_no_sam": Variant("default, no SAM (rho=0)", "esacl", {"esacl.rho": 0.0}),
    "c_erk": Variant("default, ERK layer sparsities (same global sparsity)", "esacl",
                     {"esacl.distribution": "erk"}),
    "c_input_dense": Variant("default, first layer dense (SparCL's name-based prunable set)",
                             "esacl", {"prunable": "by_layer_name"}),
    "dense_to_sparse": Variant("default, dense-to-sparse (cubic ramp over the first task)",
                               "esacl", {"esacl.dense_to_sparse": True}),
    "sparcl_derpp": Variant("SparCL-DER++", "sparcl_derpp", {}),
    "derpp": Variant("DER++ (dense)", "derpp", {}, sparse=False),
}
REFERENCE = "derpp"


@dataclasses.dataclass(frozen=True)
class Settings(sweep.SweepSettings):
    """Everything the ablation depends on (the CLI flags, one to one): the shared sweep
    settings (`sweep.SweepSettings`) and the ablation's rows."""

    program: ClassVar[str] = "experiments.ablation"
    selection_after_seeds: ClassVar[bool] = True

    variants: tuple[str, ...] = tuple(VARIANTS)
    out: str = "runs/ablation"
    validation_fraction: float = 0.1
    isolate: bool = False  # a fresh process per run (clean measured peak memory)

    def selection_args(self) -> list[str]:
        return [f"--variants={sweep.format_list(self.variants)}"]


def check(settings: Settings) -> None:
    """ValueError for unknown variants/benchmarks or impossible values (before any run)."""
    unknown = [v for v in settings.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(VARIANTS)}")
    for bench in settings.benchmarks:
        sweep.check_benchmark(bench)
    if not settings.variants or not settings.benchmarks or not settings.seeds:
        raise ValueError("need at least one variant, benchmark and seed")
    if any(VARIANTS[v].sparse for v in settings.variants) and not settings.sparsities:
        raise ValueError("sparse variants need at least one --sparsities value")
    settings.check_values()


def _common_overrides(settings: Settings) -> dict[str, Any]:
    common: dict[str, Any] = {"validation_fraction": settings.validation_fraction,
                              "buffer_size": settings.buffer_size}
    # 0 keeps the protocol's value (split_fashion_mnist_cnn_e5 sets its own subset size).
    for name in ("max_train_per_task", "epochs"):
        if getattr(settings, name):
            common[name] = getattr(settings, name)
    common.update(sweep.parse_overrides(settings.overrides))
    return common


def plan(settings: Settings) -> list[sweep.Run]:
    """The runs: every sparse variant x sparsity x seed, DER++ x seed, per benchmark."""
    out = pathlib.Path(settings.out)
    common = _common_overrides(settings)
    runs = []
    for bench in settings.benchmarks:
        for name in settings.variants:
            variant = VARIANTS[name]
            for sparsity in settings.sparsities if variant.sparse else (None,):
                overrides = {**common, **variant.overrides}
                workdir = out / bench / name
                if sparsity is not None:
                    overrides[sparsity_key(variant.method)] = sparsity
                    workdir = workdir / f"s{sparsity:g}"
                for seed in settings.seeds:
                    runs.append(sweep.Run(bench, variant.method, overrides, seed,
                                          workdir / f"seed{seed}", group=name))
    return runs


# --------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass(frozen=True)
class Line:
    """One table row: a variant's runs on one benchmark at one sparsity, over seeds."""

    benchmark: str
    sparsity: float  # 0 for the dense reference
    variant: str
    row: Any  # reporting.Row, or None when no run of the group has results


def summarize(settings: Settings, loaded: Sequence[tuple[sweep.Run, dict]]) -> list[Line]:
    """Aggregates loaded results per (benchmark, sparsity, variant), in table order."""
    from esacl_jax.harness import reporting

    lines = []
    for bench in settings.benchmarks:
        for name in settings.variants:
            sparse = VARIANTS[name].sparse
            for sparsity in settings.sparsities if sparse else (0.0,):
                members = [r for run, r in loaded if run.benchmark == bench and
                           run.group == name and
                           (not sparse or run.overrides.get(sparsity_key(run.method)) == sparsity)]
                rows = reporting.aggregate(members)
                if len(rows) > 1:
                    raise RuntimeError(f"{bench}/{name}: runs fall into several groups")
                lines.append(Line(bench, sparsity, name, rows[0] if rows else None))
    return lines


def _reference(lines: Sequence[Line], bench: str) -> Any:
    return next((x.row for x in lines if x.benchmark == bench and x.variant == REFERENCE
                 and x.row is not None), None)


def _flops_ratio(row: Any, reference: Any) -> float | None:
    if row is None or reference is None or row.training_flops is None \
            or reference.training_flops is None or reference.training_flops.mean <= 0:
        return None
    return row.training_flops.mean / reference.training_flops.mean


def _flops_exponent(rows: Sequence[Any]) -> int:
    """A power of 1000 that shows the largest FLOPs mean as 1..999 (MNIST runs are ~10^10)."""
    means = [r.training_flops.mean for r in rows if r.training_flops is not None]
    top = max(means, default=0.0)
    return 3 * int(math.floor(math.log10(top) / 3)) if top >= 1 else 0


_HEADER = ("variant", "class-IL ACC (%)", "task-IL ACC (%)", "forgetting (%)",
           "training FLOPs (×10^{exp})", "FLOPs / DER++", "wall time (s)", "seeds")


def to_markdown(settings: Settings, lines: Sequence[Line], info: dict[str, str],
                with_results: int, planned: int) -> str:
    """Provenance header, then one table per benchmark and sparsity (DER++ in each)."""
    from esacl_jax.harness import reporting

    parts = [sweep.provenance_markdown("EsaCL ablation", info)]
    parts.append(f"{with_results} of {planned} planned runs have results; buffer "
                 f"{settings.buffer_size}. Mean ± sample std over seeds. FLOPs / DER++: "
                 "training FLOPs relative to dense DER++ on the same benchmark (cost model: "
                 "docs/METHOD.md, \"One EsaCL step\"). Blank cells: no "
                 "results (run failed or not run).\n")
    for bench in settings.benchmarks:
        reference = _reference(lines, bench)
        sparsities = settings.sparsities if any(VARIANTS[v].sparse for v in settings.variants) \
            else (0.0,)
        for sparsity in sparsities:
            table = [x for x in lines if x.benchmark == bench and
                     (x.sparsity == sparsity or not VARIANTS[x.variant].sparse)]
            rows = [x.row for x in table if x.row is not None]
            exp = _flops_exponent(rows)
            header = [h.format(exp=exp) for h in _HEADER]
            title = f"## {bench}, sparsity {sparsity:g}" if sparsity else f"## {bench}"
            md = [title, "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
            for x in table:
                r = x.row
                ratio = _flops_ratio(r, reference)
                cells = [VARIANTS[x.variant].title]
                if r is None:
                    cells += [""] * 6 + ["0"]
                else:
                    cells += [reporting.format_stat(r.class_il, decimals=2),
                              reporting.format_stat(r.task_il, decimals=2),
                              reporting.format_stat(r.forgetting, decimals=2),
                              reporting.format_stat(r.training_flops, scale=10.0**exp),
                              "" if ratio is None else f"{ratio:.2f}x",
                              reporting.format_stat(r.wall_time_s, decimals=1),
                              str(r.num_seeds)]
                md.append("| " + " | ".join(cells) + " |")
            parts.append("\n".join(md) + "\n")
    return "\n".join(parts)


_CSV_STATS = ("class_il", "task_il", "forgetting", "training_flops", "wall_time_s")


def to_csv(lines: Sequence[Line], info: dict[str, str]) -> str:
    """Provenance ``#`` lines, then one record per table row (DER++ once per benchmark, sparsity
    0), numbers in full precision: accuracies in %, FLOPs, seconds."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["benchmark", "sparsity", "variant", "title", "method", "label",
                     *[f"{s}_{p}" for s in _CSV_STATS for p in ("mean", "std")],
                     "flops_vs_derpp", "num_seeds", "seeds"])
    for x in lines:
        r = x.row
        record = [x.benchmark, repr(float(x.sparsity)), x.variant, VARIANTS[x.variant].title,
                  VARIANTS[x.variant].method, "" if r is None else r.label]
        for name in _CSV_STATS:
            stat = None if r is None else getattr(r, name)
            record += ["", ""] if stat is None else [repr(stat.mean), repr(stat.std)]
        ratio = _flops_ratio(r, _reference(lines, x.benchmark))
        record += ["" if ratio is None or not math.isfinite(ratio) else repr(ratio),
                   "0" if r is None else str(r.num_seeds),
                   "" if r is None else ";".join(str(s) for s in r.seeds)]
        writer.writerow(record)
    return sweep.provenance_csv(info) + buf.getvalue()


def write_report(settings: Settings, runs: Sequence[sweep.Run]) -> list[Line]:
    """Writes <out>/ablation.md, <out>/ablation.csv and the runs' records
    (<out>/records.jsonl) from the results of `runs` (pass only runs whose results match
    their config: `SweepResult.usable_runs`); returns the rows."""
    loaded = sweep.load_results(runs)
    lines = summarize(settings, loaded)
    results = [r for _, r in loaded]
    info = sweep.provenance(settings.command(),
                            sweep.evaluation_split(settings.validation_fraction), results,
                            settings.jobs, settings.launcher)
    out = pathlib.Path(settings.out)
    markdown = to_markdown(settings, lines, info, len(loaded), len(plan(settings)))
    write_text_atomic(out / "ablation.md", markdown)
    write_text_atomic(out / "ablation.csv", to_csv(lines, info))
    sweep.write_records(results, out)
    return lines


def run_ablation(settings: Settings, progress: bool = True, dry_run: bool = False) -> int:
    """Plans, runs (resuming) and reports the ablation; returns the exit status (1: a run
    failed). Raises ValueError for bad settings and DataError for missing data before
    running anything."""
    check(settings)
    runs = plan(settings)
    if dry_run:
        for run in runs:
            print(f"{run.name}  {run.method} {run.overrides} -> {run.workdir}")
        print(f"{len(runs)} runs")
        return 0
    result = sweep.run_all(runs, jobs=settings.jobs, data_dir=settings.data_dir or None,
                           progress=progress, force=settings.force, isolate=settings.isolate,
                           **sweep.launcher_kwargs(settings))
    write_report(settings, result.usable_runs)
    if progress:
        print(f"ablation: {pathlib.Path(settings.out) / 'ablation.md'}")
    return result.exit_code


# --------------------------------------------------------------------------------------------
# Command line (flags are defined only when run as a program, so tests can import this module)


def _define_flags() -> None:
    from absl import flags

    sweep.define_common_flags(Settings(), "esacl.sparsity values.")
    flags.DEFINE_list("variants", list(Settings().variants), f"Rows: {', '.join(VARIANTS)}.")



def main(argv: list[str]) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    sweep.run_program(lambda f: Settings(**sweep.common_settings(f), variants=tuple(f.variants)),
                      run_ablation, early=_EARLY)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
