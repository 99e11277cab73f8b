"""Sweeps, the EsaCL ablation and the comparison, end to end on the bundled digits (split_digits).

Tiny settings (one seed, one sparsity, two rows, one epoch, 100 examples per task) keep each
training run to a few seconds; the library functions are called directly, the absl CLI once.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from esacl_jax.harness import sweep
from esacl_jax.harness.data import DataError
from esacl_jax.harness.data import sources as data_sources
from experiments import ablation, compare
from tests.conftest import REPO_ROOT

TINY = dict(benchmarks=("split_digits",), sparsities=(0.9,), seeds=(0,), jobs=1, epochs=1,
            max_train_per_task=100)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ablation_settings(out, **kw) -> ablation.Settings:
    return ablation.Settings(**{**TINY, "variants": ("esacl", "derpp"), "out": str(out), **kw})


def _compare_settings(out, **kw) -> compare.Settings:
    return compare.Settings(**{**TINY, "methods": ("finetune", "esacl"), "out": str(out),
                               "isolate": False, **kw})


@pytest.fixture(scope="module")
def ablation_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    assert ablation.run_ablation(_ablation_settings(out), progress=False) == 0
    return out


# ----- pure helpers (no training) -----


def test_overrides_parse_and_apply():
    assert sweep.parse_overrides(["esacl.rho=0.1", "model=resnet18", "esacl.sdp=False",
                                  "mlp_widths=(50, 50)"]) == {
        "esacl.rho": 0.1, "model": "resnet18", "esacl.sdp": False, "mlp_widths": (50, 50)}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sweep.parse_overrides(["esacl.rho"])
    config = ml_collections.ConfigDict({"a": 1.0, "w": (1, 2), "sub": {"b": True}})
    sweep.apply_overrides(config, {"a": 2, "w": [3, 4], "sub.b": False})
    assert config.a == 2.0 and config.w == (3, 4) and config.sub.b is False
    with pytest.raises(KeyError, match="no field 'nope'"):
        sweep.apply_overrides(config, {"sub.nope": 1})
    with pytest.raises(KeyError, match="no section 'x'"):
        sweep.apply_overrides(config, {"x.b": 1})


def test_full_plans_have_the_documented_size():
    runs = ablation.plan(ablation.Settings())
    sparse_rows = len(ablation.VARIANTS) - 1  # every row but the dense DER++ reference
    assert len(runs) == 2 * (sparse_rows * 3 + 1) * 3
    assert len({r.workdir for r in runs}) == len(runs)
    assert {r.overrides["validation_fraction"] for r in runs} == {0.1}
    methods = list(compare.DEFAULT_METHODS)
    runs = compare.plan(compare.Settings(), methods)
    assert len(runs) == 2 * (6 + 6 * 3) * 3
    assert len({r.workdir for r in runs}) == len(runs)
    assert {r.overrides["validation_fraction"] for r in runs} == {0.0}
    sparse = [r for r in runs if r.method == "sparcl_er"]
    assert {r.overrides["sparcl.sparsity"] for r in sparse} == {0.75, 0.9, 0.95}
    assert sparse[0].name == "split_mnist/sparcl_er/s0.75/seed0"


def test_zero_subset_and_epochs_keep_the_protocols_values():
    """--max_train_per_task=0 / --epochs=0 mean "the protocol's": the CNN protocol keeps its
    4000-example subset and 5 epochs; a positive value still overrides."""
    bench = "split_fashion_mnist_cnn_e5"
    for runs in (ablation.plan(ablation.Settings(benchmarks=(bench,), variants=("derpp",),
                                                 seeds=(0,))),
                 compare.plan(compare.Settings(benchmarks=(bench,), seeds=(0,)), ["derpp"])):
        config = sweep.build_config(runs[0])
        assert (config.max_train_per_task, config.epochs) == (4000, 5)
    runs = compare.plan(compare.Settings(benchmarks=(bench,), seeds=(0,), max_train_per_task=100,
                                         epochs=1), ["derpp"])
    config = sweep.build_config(runs[0])
    assert (config.max_train_per_task, config.epochs) == (100, 1)


def test_bad_settings_fail_before_running(tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        ablation.run_ablation(_ablation_settings(tmp_path, variants=("nope",)), progress=False)
    with pytest.raises(ValueError, match="no protocol"):
        compare.run_comparison(_compare_settings(tmp_path, benchmarks=("nope",)),
                               progress=False)
    with pytest.raises(ValueError, match="cannot run"):
        compare.run_comparison(_compare_settings(tmp_path, methods=("nope",)), progress=False)
    assert not any(tmp_path.iterdir())


def test_missing_data_stops_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(data_sources.tfds, "tfds_available", lambda: False)  # local files only
    settings = _ablation_settings(tmp_path / "out", benchmarks=("split_mnist",),
                                  data_dir=str(tmp_path / "no_data"))
    with pytest.raises(DataError, match="MNIST"):
        ablation.run_ablation(settings, progress=False)
    assert not (tmp_path / "out").exists()


# ----- ablation -----


def test_ablation_writes_tables_with_provenance(ablation_out):
    md = (ablation_out / "ablation.md").read_text()
    assert "## split_digits, sparsity 0.9" in md
    assert f"| {ablation.VARIANTS['esacl'].title} |" in md and "| DER++ (dense) |" in md
    assert "evaluation split: validation" in md and "git commit" in md and "CPU cores" in md
    assert "python -m experiments.ablation --benchmarks=split_digits" in md
    assert "2 of 2 planned runs have results" in md
    records = sweep.read_csv_records(ablation_out / "ablation.csv")
    assert [r["variant"] for r in records] == ["esacl", "derpp"]
    assert all(float(r["class_il_mean"]) > 0 and r["num_seeds"] == "1" for r in records)
    assert float(records[1]["flops_vs_derpp"]) == 1.0
    assert 0 < float(records[0]["flops_vs_derpp"]) < 1.0  # sparse EsaCL costs less than DER++
    assert (ablation_out / "ablation.csv").read_text().startswith("# command: python -m")
    saved = json.loads((ablation_out / "split_digits/esacl/s0.9/seed0/results.json").read_text())
    assert saved["config"]["validation_fraction"] == 0.1  # never tuned on test
    assert saved["config"]["esacl"]["sparsity"] == 0.9 and saved["config"]["epochs"] == 1


def test_second_invocation_skips_existing_runs(ablation_out):
    start = time.perf_counter()
    stream = io.StringIO()
    result = sweep.run_all(ablation.plan(_ablation_settings(ablation_out)), stream=stream)
    assert result.count("skipped") == 2 and result.exit_code == 0
    assert time.perf_counter() - start < 10
    assert "skipping 2 with results.json" in stream.getvalue()


def test_results_of_another_config_are_not_reused(ablation_out):
    stream = io.StringIO()
    result = sweep.run_all(ablation.plan(_ablation_settings(ablation_out, epochs=2)),
                           stream=stream)
    assert result.exit_code == 1 and len(result.failed) == 2 and not result.usable_runs
    assert "epochs: 1 -> 2" in result.failed[0].error and "--force" in result.failed[0].error


def test_config_differences_skip_sections_the_method_does_not_read():
    stored = {"method": "derpp", "epochs": 1, "data_dir": "/a", "esacl": {"gamma": 0.5},
              "sparcl": {"dgm": True}, "ewc": {"ewc_lambda": 90.0}}
    planned = {"method": "derpp", "epochs": 1, "data_dir": "/b", "esacl": {"gamma": 0.25},
               "sparcl": {"dgm": False}, "ewc": {"ewc_lambda": 90.0}}
    assert sweep.config_differences(planned, stored) == []  # derpp reads neither section
    assert sweep.config_differences({**planned, "ewc": {"ewc_lambda": 10.0}}, stored) == [
        "ewc.ewc_lambda: 90.0 -> 10.0"]  # ewc is shared: always compared
    esacl_stored, esacl_planned = {**stored, "method": "esacl"}, {**planned, "method": "esacl"}
    assert sweep.config_differences(esacl_planned, esacl_stored) == ["esacl.gamma: 0.5 -> 0.25"]
    sparcl = sweep.config_differences({**planned, "method": "sparcl_er"},
                                      {**stored, "method": "sparcl_er"})
    assert sparcl == ["sparcl.dgm: True -> False"]


def test_config_differences_fields_only_one_side_has():
    """A field only one side has is a difference: a stored run lacking a field of the planned
    config counts as made with another config."""
    stored = {"method": "esacl", "epochs": 1, "esacl": {"gamma": 0.25}}
    planned = {**stored, "esacl": {"gamma": 0.25, "init_rescale": False}}
    assert sweep.config_differences(planned, stored) == [
        "esacl.init_rescale: (not recorded) -> False"]
    assert sweep.config_differences({**planned, "new_field": 3}, stored) == [
        "esacl.init_rescale: (not recorded) -> False", "new_field: (not recorded) -> 3"]
    # A derpp run does not read the esacl section, so a new EsaCL field leaves it valid.
    assert sweep.config_differences({**planned, "method": "derpp"},
                                    {**stored, "method": "derpp"}) == []
    # A field the schema dropped, or a whole section the stored run lacks, means another config.
    assert sweep.config_differences(stored, {**stored, "esacl": {"gamma": 0.25, "old": 1}}) == [
        "esacl.old: 1 -> (not in the config schema)"]
    assert sweep.config_differences({**stored, "extra": {"a": 1}}, stored) == [
        "extra.a: (not recorded) -> 1"]
    # Fields that do not change the computation are never compared.
    assert sweep.config_differences({**stored, "checkpoint": True, "data_dir": "/x"},
                                    stored) == []


def test_ablation_cli(ablation_out):
    """The absl entry point with the fixture's settings: everything is skipped, report rewritten."""
    (ablation_out / "ablation.md").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.ablation", "--benchmarks=split_digits",
         "--sparsities=0.9", "--seeds=0", "--variants=esacl,derpp", "--jobs=1", "--epochs=1",
         "--max_train_per_task=100", f"--out={ablation_out}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "2 skipped" in proc.stdout and (ablation_out / "ablation.md").exists()
    bad = subprocess.run([sys.executable, "-m", "experiments.ablation", "--variants=nope"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown variant" in bad.stderr


# ----- comparison -----


def test_compare_writes_table_plots_and_docs(tmp_path, capsys):
    docs = tmp_path / "docs"
    settings = _compare_settings(tmp_path / "out", docs_dir=str(docs))
    assert compare.run_comparison(settings) == 0
    out = tmp_path / "out"
    md = (out / "comparison.md").read_text()
    assert "### split_digits" in md and "| finetune |" in md
    esacl_row = next(line for line in md.splitlines() if line.startswith("| esacl | 0.9 |"))
    assert "| 500 |" in esacl_row and "± 0.0 |" in esacl_row  # buffer; sparsity, all weights
    assert "evaluation split: test" in md and "python -m experiments.compare" in md
    records = sweep.read_csv_records(out / "comparison.csv")
    assert [r["method"] for r in records] == ["finetune", "esacl"]
    for name in compare.OUTPUT_FILES:
        assert (out / name).stat().st_size > 0 and (docs / name).exists(), name
    for name in ("accuracy_vs_flops.png", "accuracy_matrix_esacl.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert compare.CIFAR10_COMMAND in printed and "class-IL" in printed and "ETA" in printed


def test_failing_run_gives_nonzero_exit_and_others_complete(tmp_path, capsys):
    # esacl runs first and fails (gamma must be in (0, 1]); finetune still runs after it
    settings = _compare_settings(tmp_path, methods=("esacl", "finetune"),
                                 overrides=("esacl.gamma=2.0",))
    assert compare.run_comparison(settings) == 1
    assert (tmp_path / "split_digits/finetune/seed0/results.json").exists()
    assert not (tmp_path / "split_digits/esacl/s0.9/seed0/results.json").exists()
    printed = capsys.readouterr().out
    assert "FAILED split_digits/esacl/s0.9/seed0: ValueError" in printed
    assert "esacl.gamma" in printed
    md = (tmp_path / "comparison.md").read_text()
    assert "| finetune |" in md and "1 of 2 planned runs" in md


def test_worker_processes_report_failures(tmp_path):
    """Both pool kinds ("spawn" workers, a fresh process per run) return failures as outcomes."""
    bad = [sweep.Run("split_digits", "finetune", {"esacl.nope": 1}, seed, tmp_path / f"r{seed}")
           for seed in range(3)]
    result = sweep.run_all(bad[:2], jobs=2, progress=False)
    assert result.exit_code == 1 and len(result.failed) == 2
    assert "no field 'nope'" in result.failed[0].error
    result = sweep.run_all(bad[2:], jobs=1, isolate=True, progress=False)
    assert result.exit_code == 1 and "no field 'nope'" in result.failed[0].error
