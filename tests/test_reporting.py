"""Reporting (load, aggregate, tables, plots), the run logger and the report CLI.

Uses hand-made results.json files (`make_result`), never real training runs.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from esacl_jax import metrics as metrics_lib
from esacl_jax.harness import reporting, run_logger
from esacl_jax.harness.atomic_io import write_json_atomic
from esacl_jax.harness.config import base_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MiB = 1024**2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def accuracy_matrix(final: float, num_tasks: int = 5, peak: float = 0.98) -> list[list]:
    """A T x T matrix: `peak` on the diagonal, decaying below it, zero-shot ~0 above, and a last
    row equal to `final` everywhere, so ACC = final and forgetting = peak - final."""
    a = np.zeros((num_tasks, num_tasks))
    for i in range(num_tasks):
        for j in range(i + 1):
            a[i, j] = peak - 0.05 * (i - j) * (peak - final) / max(num_tasks - 1, 1)
    a[-1, :] = final
    return a.tolist()


def make_result(method: str = "esacl", *, seed: int = 0, benchmark: str = "split_mnist",
                acc: float = 0.9, task_acc: float | None = 0.97, flops: float | None = 2e12,
                host_rss: float | None = 500 * MiB, device_peak: float | None = None,
                wall: float = 60.0, commit: str = "abc123", num_tasks: int = 5,
                **overrides) -> dict:
    """A results.json-shaped dict; `overrides` set config fields ("esacl.gamma" style keys)."""
    config = base_config().to_dict()
    config.update(method=method, seed=seed, benchmark=benchmark)
    for key, value in overrides.items():
        section, _, field = key.replace("__", ".").rpartition(".")
        (config[section] if section else config)[field] = value
    class_il = accuracy_matrix(acc, num_tasks)
    task_il = None if task_acc is None else accuracy_matrix(task_acc, num_tasks, peak=0.995)
    result = {
        "config": config,
        "seed": seed,
        "benchmark": {"name": benchmark, "scenario": "class_il", "num_tasks": num_tasks,
                      "num_classes": 2 * num_tasks, "source": "idx"},
        "method": method,
        "class_il_matrix": class_il,
        "task_il_matrix": task_il,
        "metrics": metrics_lib.summarize_run(class_il, task_il),
        "train_time_per_task_s": [wall / num_tasks * 0.9] * num_tasks,
        "eval_time_per_task_s": [wall / num_tasks * 0.1] * num_tasks,
        "per_task": [{"task": t, "classes": [2 * t, 2 * t + 1], "train_examples_seen": 12000}
                     for t in range(num_tasks)],
        "wall_time_s": wall,
        "environment": {"git_commit": commit, "devices": ["cpu"], "backend": "cpu"},
    }
    if flops is not None:
        result["training_flops"] = flops
    if host_rss is not None or device_peak is not None:
        result["memory"] = {
            "analytic": {"weights": 1000, "masks": 100, "opt_state": 0, "buffer": 4000,
                         "activations": 900, "total": 6000},
            "measured": {"host_peak_rss_bytes": host_rss, "device_peak_bytes": device_peak},
        }
    return result


def write_runs(root: pathlib.Path, results: list[dict]) -> None:
    for k, result in enumerate(results):
        d = root / f"{result['method']}_{k}" / f"seed{result['seed']}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(result))


def sample_runs() -> list[dict]:
    """Three seeds of EsaCL, one of a gamma variant, one sparsity-0.75 EsaCL, one finetune."""
    esacl = [make_result("esacl", seed=s, acc=a, flops=f, host_rss=m * MiB, wall=w, commit=c)
             for s, a, f, m, w, c in [(0, 0.90, 1e12, 100, 10.0, "abc123"),
                                      (1, 0.92, 2e12, 200, 20.0, "abc123"),
                                      (2, 0.94, 3e12, 300, 30.0, "def456")]]
    return esacl + [
        make_result("esacl", seed=0, acc=0.80, esacl__gamma=1.0, esacl__step_variant="B"),
        make_result("esacl", seed=0, acc=0.85, esacl__sparsity=0.75),
        make_result("finetune", seed=0, acc=0.19, task_acc=0.95, flops=5e11,
                    host_rss=None, device_peak=300 * MiB),
    ]


# --------------------------------------------------------------------------------------------
# labels, sparsity, loading


def test_labels_sparsity_and_buffer():
    assert reporting.method_label(make_result("esacl")) == "esacl"
    r = make_result("esacl", esacl__gamma=1.0, esacl__step_variant="B")
    assert reporting.method_label(r) == "esacl[B,gamma=1]"
    r = make_result("esacl", esacl__sdp=False, esacl__replay="none", esacl__rho=0.1)
    assert reporting.method_label(r) == "esacl[rho=0.1,sdp=off,replay=none]"
    assert reporting.buffer_of(r) is None
    assert reporting.method_label(make_result("sparcl_derpp")) == "sparcl_derpp"
    assert reporting.method_label(make_result("sparcl", sparcl__ddr=False)) == "sparcl[ddr=off]"
    assert reporting.method_label(make_result("finetune", esacl__gamma=2.0)) == "finetune"

    assert reporting.sparsity_of(make_result("finetune")) == 0.0
    assert reporting.sparsity_of(make_result("derpp")) == 0.0
    assert reporting.sparsity_of(make_result("esacl", esacl__sparsity=0.95)) == 0.95
    assert reporting.sparsity_of(make_result("sparcl_er")) == 0.9
    assert reporting.sparsity_of(make_result("prune_retrain", prune_retrain__sparsity=0.5)) == 0.5

    assert reporting.buffer_of(make_result("finetune")) is None
    assert reporting.buffer_of(make_result("ewc")) is None
    assert reporting.buffer_of(make_result("er", buffer_size=200)) == 200
    assert reporting.benchmark_of({"benchmark": "split_cifar10"}) == "split_cifar10"


def test_variant_defaults_match_base_config():
    config = base_config().to_dict()
    for _, (section, defaults) in reporting.VARIANT_KNOBS.items():
        for knob, default in defaults.items():
            assert config[section][knob] == default, (section, knob)


def test_load_runs_skips_bad_files(tmp_path, caplog):
    write_runs(tmp_path, sample_runs()[:2])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"method": "esacl", "metr')
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "results.json").write_text("[1, 2]")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "results.json").write_bytes(b"\xff\xfe\x00garbage")
    with caplog.at_level(logging.WARNING, logger="esacl_jax.harness.reporting"):
        runs = reporting.load_runs(tmp_path)
    assert len(runs) == 2
    assert all(pathlib.Path(r["path"]).name == "results.json" for r in runs)
    assert sum("skipping" in m for m in caplog.messages) == 3
    assert reporting.load_runs(tmp_path / "missing") == []


def test_unregistered_method_counts_as_dense():
    """A results.json of a method the registry does not know still reports (dense, buffer as
    recorded)."""
    result = make_result("retired_method", buffer_size=200)
    assert reporting.sparsity_of(result) == 0.0
    assert reporting.buffer_of(result) == 200
    assert reporting.method_label(result) == "retired_method"
    (row,) = reporting.aggregate([result])
    assert row.sparsity == 0.0 and row.buffer == 200


def test_results_json_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "run" / "results.json", {"acc": np.float32(0.5)})
    finally:
        os.umask(old)
    path = tmp_path / "run" / "results.json"
    assert path.stat().st_mode & 0o777 == 0o644
    assert json.loads(path.read_text()) == {"acc": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary left


# --------------------------------------------------------------------------------------------
# aggregation and tables


def rows_by_label(rows):
    return {(r.label, r.sparsity): r for r in rows}


def test_aggregate_means_and_stds():
    rows = reporting.aggregate(sample_runs())
    assert [(r.label, r.sparsity) for r in rows] == [
        ("finetune", 0.0), ("esacl", 0.75), ("esacl", 0.9), ("esacl[B,gamma=1]", 0.9)]
    esacl = rows_by_label(rows)[("esacl", 0.9)]
    assert esacl.num_seeds == 3 and esacl.seeds == (0, 1, 2)
    assert esacl.commits == ("abc123", "def456")
    assert esacl.buffer == 500 and esacl.benchmark == "split_mnist"
    # ACC 90/92/94 -> 92 ± 2 (sample std); forgetting = 98 - ACC -> 6 ± 2.
    assert esacl.class_il.mean == pytest.approx(92.0)
    assert esacl.class_il.std == pytest.approx(2.0)
    assert esacl.class_il.n == 3
    assert esacl.forgetting.mean == pytest.approx(6.0)
    assert esacl.forgetting.std == pytest.approx(2.0)
    assert esacl.task_il.mean == pytest.approx(97.0) and esacl.task_il.std == pytest.approx(0.0)
    assert esacl.training_flops.mean == pytest.approx(2e12)
    assert esacl.training_flops.std == pytest.approx(1e12)
    assert esacl.peak_memory_bytes.mean == pytest.approx(200 * MiB)
    assert esacl.peak_memory_bytes.std == pytest.approx(100 * MiB)
    assert esacl.wall_time_s.mean == pytest.approx(20.0)
    assert esacl.wall_time_s.std == pytest.approx(10.0)
    assert esacl.analytic_memory_bytes.mean == 6000

    finetune = rows_by_label(rows)[("finetune", 0.0)]
    assert finetune.num_seeds == 1 and finetune.buffer is None
    assert finetune.class_il == reporting.Stat(19.0, 0.0, 1)
    # the device peak wins over host RSS when a run has one
    assert finetune.peak_memory_bytes.mean == 300 * MiB


def test_aggregate_tolerates_old_files_and_nulls():
    old = make_result("derpp", flops=None, host_rss=None, task_acc=None)
    old["class_il_matrix"][0][3] = None
    partial = make_result("derpp", seed=1, flops=4e12, host_rss=None)
    (row,) = reporting.aggregate([old, partial])
    assert row.training_flops == reporting.Stat(4e12, 0.0, 1)  # only the run that has it
    assert row.peak_memory_bytes is None and row.analytic_memory_bytes is None
    assert row.task_il.n == 1
    (row,) = reporting.aggregate([old])
    assert row.training_flops is None and row.task_il is None
    table = reporting.to_markdown([row])
    cells = table.strip().splitlines()[-1].split("|")[1:-1]
    assert [c.strip() for c in cells] == ["derpp", "0", "", "", "500", "90.00 ± 0.00", "",
                                          "8.00 ± 0.00", "", "", "60.0 ± 0.0", "1"]


def test_markdown_cells_and_units():
    rows = reporting.aggregate(sample_runs())
    table = reporting.to_markdown(rows)
    lines = table.splitlines()
    assert lines[0] == "### split_mnist"
    assert "training FLOPs (×10^12)" in lines[2]
    assert "peak memory (MiB)" in lines[2] and "class-IL ACC (%)" in lines[2]
    esacl_line = next(line for line in lines if line.startswith("| esacl | 0.9 |"))
    for cell in ("92.00 ± 2.00", "97.00 ± 0.00", "6.00 ± 2.00", "2.00 ± 1.00",
                 "200.0 ± 100.0", "20.0 ± 10.0", "| 3 |", "| 500 |"):
        assert cell in esacl_line, cell
    assert "| esacl[B,gamma=1] | 0.9 |" in table
    finetune_line = next(line for line in lines if line.startswith("| finetune |"))
    assert "| finetune | 0 |  |  |  |" in finetune_line and "0.500 ± 0.000" in finetune_line

    big = [make_result("esacl", seed=s, flops=f, benchmark="split_cifar10")
           for s, f in [(0, 2.5e15), (1, 3.5e15)]]
    table = reporting.to_markdown(reporting.aggregate(big + sample_runs()))
    cifar, mnist = table.split("### split_mnist")
    assert "×10^15" in cifar and "3.00 ± 0.71" in cifar
    assert "×10^12" in mnist
    assert reporting.to_markdown([]) == ""


def test_csv_round_trip(tmp_path):
    runs = sample_runs() + [make_result("derpp", flops=None, host_rss=None, task_acc=None)]
    for k, r in enumerate(runs):
        r["path"] = f"/runs/{k}/results.json"
    rows = reporting.aggregate(runs)
    path = tmp_path / "nested" / "table.csv"
    reporting.to_csv(rows, path)
    assert reporting.read_csv(path) == rows
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(rows)
    esacl = next(r for r in records if r["label"] == "esacl" and r["sparsity"] == "0.9")
    assert float(esacl["class_il_mean"]) == pytest.approx(92.0)
    assert esacl["seeds"] == "0;1;2" and esacl["commits"] == "abc123;def456"
    assert [p.name for p in path.parent.iterdir()] == ["table.csv"]  # no temp files left


# --------------------------------------------------------------------------------------------
# plots


def assert_png(path: pathlib.Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(np.var(image[..., :3])) > 1e-3  # not a blank canvas


def test_plot_accuracy_matrix(tmp_path):
    result = make_result("esacl", esacl__gamma=1.0)
    result["class_il_matrix"][0][4] = None
    path = tmp_path / "plots" / "matrix.png"
    reporting.plot_accuracy_matrix(result, path)
    assert_png(path)
    reporting.plot_accuracy_matrix(result, tmp_path / "task.png", setting="task_il")
    assert_png(tmp_path / "task.png")
    with pytest.raises(ValueError, match="task_il_matrix"):
        reporting.plot_accuracy_matrix(make_result(task_acc=None), tmp_path / "x.png", "task_il")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["matrix.png", "plots", "task.png"]


def test_plot_accuracy_vs_flops(tmp_path):
    runs = sample_runs() + [make_result("sparcl_derpp", seed=s, acc=0.88, flops=1.5e12)
                            for s in (0, 1)]
    rows = reporting.aggregate(runs)
    reporting.plot_accuracy_vs_flops(rows, tmp_path / "tradeoff.png")
    assert_png(tmp_path / "tradeoff.png")
    two = reporting.aggregate(runs + [make_result(benchmark="split_cifar10", flops=3e15)])
    reporting.plot_accuracy_vs_flops(two, tmp_path / "both.png")
    reporting.plot_accuracy_vs_flops(two, tmp_path / "cifar.png", benchmark="split_cifar10")
    assert_png(tmp_path / "both.png")
    assert_png(tmp_path / "cifar.png")
    # runs without FLOPs: still a valid figure that says so
    old = reporting.aggregate([make_result(flops=None)])
    reporting.plot_accuracy_vs_flops(old, tmp_path / "old.png")
    assert (tmp_path / "old.png").read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------------------------
# run logger


def read_scalar_events(logdir: pathlib.Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TFRecord event files under `logdir`."""
    from tensorboardX.proto import event_pb2

    out = []
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, "no event file written"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]  # skip length + its crc
            pos += 12 + length + 4  # payload + its crc
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                out.append((value.tag, event.step, value.simple_value))
    return out


def test_tensorboard_logger_round_trip(tmp_path):
    with run_logger.make_logger(tmp_path, enabled=True) as logger:
        assert isinstance(logger, run_logger.TensorBoardLogger)
        logger.scalar("train/loss", np.float32(0.5), step=1)
        logger.scalars({"eval/acc_task_0": 0.75, "sparsity": np.asarray(0.9)}, step=2)
        logger.scalar("flops/cumulative", 1.5e12, step=3)
        logger.flush()
    assert logger.closed
    with pytest.raises(RuntimeError):
        logger.scalar("late", 1.0, 4)
    events = read_scalar_events(tmp_path)
    assert [(t, s) for t, s, _ in events] == [("train/loss", 1), ("eval/acc_task_0", 2),
                                              ("sparsity", 2), ("flops/cumulative", 3)]
    np.testing.assert_allclose([v for _, _, v in events], [0.5, 0.75, 0.9, 1.5e12], rtol=1e-6)


def test_null_logger_and_validation(tmp_path):
    logger = run_logger.make_logger(tmp_path / "off", enabled=False)
    assert isinstance(logger, run_logger.NullLogger)
    with logger:
        logger.scalars({"a": 1.0}, step=0)
    assert not (tmp_path / "off").exists()
    with run_logger.NullLogger() as null, pytest.raises(ValueError, match="single number"):
        null.scalar("vector", [1.0, 2.0], 0)


# --------------------------------------------------------------------------------------------
# CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.report", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_empty_dir_fails(tmp_path):
    proc = run_cli(f"--runs={tmp_path}")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "results.json" in lines[0]


def test_cli_writes_report(tmp_path):
    write_runs(tmp_path / "runs", sample_runs())
    (tmp_path / "runs" / "junk").mkdir()
    (tmp_path / "runs" / "junk" / "results.json").write_text("not json")
    proc = run_cli(f"--runs={tmp_path / 'runs'}", f"--out={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    assert "| esacl | 0.9 |  |  | 500 | 92.00 ± 2.00 |" in proc.stdout
    assert "junk" in proc.stderr  # the bad file is reported, not fatal
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["accuracy_matrix_esacl_B_gamma=1.png", "accuracy_matrix_esacl_s0.75.png",
                     "accuracy_matrix_esacl_s0.9.png", "accuracy_matrix_finetune.png",
                     "accuracy_vs_flops.png", "table.csv", "table.md"]
    assert (tmp_path / "out" / "table.md").read_text() in proc.stdout
    assert_png(tmp_path / "out" / "accuracy_vs_flops.png")
    proc = run_cli(f"--runs={tmp_path / 'runs'}", "--benchmark=split_cifar10")
    assert proc.returncode == 1 and "split_cifar10" in proc.stderr


def test_tables_show_sparsity_over_all_weights_beside_the_prunable_set():
    runs = [make_result("esacl", seed=s) for s in (0, 1)]
    for run, nonzero in zip(runs, (100, 110), strict=True):
        run["weights"] = {"total": 1000, "nonzero": nonzero, "sparsity": 1 - nonzero / 1000}
    (row,) = reporting.aggregate(runs)
    assert row.sparsity == 0.9  # the prunable set's target
    assert row.sparsity_all.mean == pytest.approx(89.5) and row.nonzero_weights.mean == 105
    line = reporting.to_markdown([row]).strip().splitlines()[-1]
    assert line.startswith("| esacl | 0.9 | 89.5 ± 0.7 | 105 ± 7 | 500 |"), line


def test_paired_differences_and_standard_errors(tmp_path):
    """Hand-computed: per-seed differences (+2, +4, +3 points) -> mean +3, SE 1/sqrt(3);
    a seed only one side has is left out of the pairing."""
    root = tmp_path / "runs"
    accs = {"derpp": [0.90, 0.88, 0.91, 0.50], "esacl/s0.9": [0.92, 0.92, 0.94]}
    for group, values in accs.items():
        for seed, acc in enumerate(values):
            d = root / "split_mnist" / group / f"seed{seed}"
            d.mkdir(parents=True)
            method = group.split("/")[0]
            (d / "results.json").write_text(json.dumps(make_result(method, seed=seed, acc=acc)))
    runs = reporting.load_runs(root)
    rows = {r.group: r for r in reporting.paired_rows(runs, root, "derpp")}
    assert set(rows) == {"derpp", "esacl/s0.9"}
    assert rows["derpp"].difference is None and rows["derpp"].seeds == (0, 1, 2, 3)
    diff = rows["esacl/s0.9"].difference
    assert diff.n == 3 and diff.mean == pytest.approx(3.0)
    assert diff.std == pytest.approx(1.0 / np.sqrt(3.0))  # std(2, 4, 3) = 1
    assert rows["esacl/s0.9"].forgetting.mean == pytest.approx(98.0 - 92.666667, abs=1e-4)
    text = reporting.paired_markdown(list(rows.values()), "derpp")
    assert "| esacl/s0.9 | 0,1,2 | 92.67 ± 1.15 |" in text and "+3.00 ± 0.58 (n=3)" in text
    proc = run_cli(f"--runs={root}", f"--out={tmp_path / 'out'}", "--paired_with=esacl")
    assert proc.returncode == 1 and "esacl/s0.9" in proc.stderr  # names the known groups
    proc = run_cli(f"--runs={root}", f"--out={tmp_path / 'out'}", "--paired_with=derpp")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "paired.md").read_text() in proc.stdout


def test_paired_across_protocols_through_linked_sweeps(tmp_path):
    """A directory of links to two sweeps' outputs reports both (a link cycle is visited once);
    with across_protocols a sparse-wide protocol pairs with a dense-narrow one on the same data."""
    for sweep_dir, group, protocol, accs in [("narrow", "derpp", "split_mnist", [0.90, 0.91]),
                                             ("wide", "esacl", "split_mnist_w400", [0.92, 0.92])]:
        for seed, acc in enumerate(accs):
            d = tmp_path / sweep_dir / protocol / group / f"seed{seed}"
            d.mkdir(parents=True)
            result = make_result(group, seed=seed, acc=acc, protocol=protocol)
            (d / "results.json").write_text(json.dumps(result))
    view = tmp_path / "view"
    view.mkdir()
    (view / "narrow").symlink_to(tmp_path / "narrow")
    (view / "wide").symlink_to(tmp_path / "wide")
    (tmp_path / "wide" / "loop").symlink_to(view)  # a cycle: each directory read once
    runs = reporting.load_runs(view)
    assert len(runs) == 4
    per_protocol = reporting.paired_rows(runs, view, "narrow/derpp")
    assert all(r.difference is None for r in per_protocol)  # different protocols: no pairs
    rows = {r.group: r for r in reporting.paired_rows(runs, view, "narrow/derpp",
                                                      across_protocols=True)}
    assert {r.benchmark for r in rows.values()} == {"split_mnist"}
    assert rows["wide/esacl"].difference.mean == pytest.approx(1.5)  # +2 and +1 points
    assert rows["wide/esacl"].difference.std == pytest.approx(0.5)


def test_a_network_of_another_size_gets_its_own_row():
    """--set=mlp_widths=[62,62] on a protocol is not merged with the protocol's own network."""
    own = make_result("derpp", protocol="split_mnist", mlp_widths=[100, 100])
    narrow = make_result("derpp", protocol="split_mnist", mlp_widths=[62, 62])
    cnn = make_result("derpp", protocol="split_fashion_mnist_cnn_e5", model="cnn", resnet_nf=6)
    assert reporting.method_label(own) == "derpp"
    assert reporting.method_label(narrow) == "derpp[mlp_widths=62-62]"
    assert reporting.method_label(cnn) == "derpp[resnet_nf=6]"
    assert len(reporting.aggregate([own, narrow])) == 2


def test_paper_table_layout_costs_and_paired_differences(tmp_path):
    """Hand-computed: EsaCL at 0.9 is +1 and +3 points over DER++ on seeds 0 and 1 (mean +2,
    SE 1), costs 0.1x its FLOPs, and its footprint counts the compact export's bytes as the
    model, plus buffer, optimizer state and method state; a run recorded before method state
    was counted for every method gets no footprint (not an undercount)."""
    def run(method, seed, acc, flops, sparse_bytes=None, **overrides):
        result = make_result(method, seed=seed, acc=acc, flops=flops, **overrides)
        result["memory"]["analytic"].update(params=4 * MiB, opt_state=MiB, buffer=2 * MiB,
                                            method_state=3 * MiB)
        result["memory"]["method_state_counted"] = ["masks"]
        if sparse_bytes is not None:
            result["sparse_export"] = {"file": "sparse_model.npz", "bytes": sparse_bytes}
        return result

    runs = [run("derpp", 0, 0.90, 1e12), run("derpp", 1, 0.88, 1e12),
            run("esacl", 0, 0.91, 1e11, MiB // 2), run("esacl", 1, 0.91, 1e11, MiB // 2),
            run("sparcl_derpp", 0, 0.90, 2e11, MiB, sparcl__sparsity=0.9),
            run("sparcl_derpp", 1, 0.90, 2e11, MiB, sparcl__sparsity=0.9),
            run("esacl", 0, 0.80, 5e10, MiB // 4, esacl__sparsity=0.95)]
    assert reporting.paper.footprint_of(runs[2]) == {
        "model": MiB // 2, "buffer": 2 * MiB, "opt_state": MiB, "method_state": 3 * MiB,
        "total": MiB // 2 + 6 * MiB}
    assert reporting.paper.footprint_of(runs[0])["total"] == 10 * MiB  # dense: its parameters
    old = make_result("esacl", seed=2)
    old["memory"]["analytic"].update(params=4 * MiB, opt_state=MiB, buffer=2 * MiB)
    assert reporting.paper.footprint_of(old) is None
    text = reporting.paper.paper_markdown(runs)
    lines = text.splitlines()
    assert ("| method | dense class-IL | dense task-IL | 0.9 class-IL | 0.9 task-IL | "
            "0.95 class-IL | 0.95 task-IL |") in lines
    assert "| derpp | 89.00 ± 1.41 | 97.00 ± 0.00 |  |  |  |  |" in lines
    assert "| esacl |  |  | 91.00 ± 0.00 | 97.00 ± 0.00 | 80.00 ± 0.00 | 97.00 ± 0.00 |" in lines
    assert "| esacl | 0.9 | 2 | 0.100x |  | 6.50 | 0.50 | 2.00 | 1.00 | 3.00 |" in lines
    assert "| derpp | 0 | 2 | 1.000x |  | 10.00 | 4.00 | 2.00 | 1.00 | 3.00 |" in lines
    # paired: vs DER++ (+1, +3) -> +2 ± 1; vs SparCL-DER++ (+1, +1) -> +1 ± 0; at 0.95 one seed
    assert "| 0.9 | 91.00 ± 0.00 | +2.00 ± 1.00 | +1.00 ± 0.00 |" in lines
    assert "| 0.95 | 80.00 ± 0.00 |  |  |" in lines

    root = tmp_path / "runs"
    write_runs(root, runs)
    proc = run_cli(f"--runs={root}", f"--out={tmp_path / 'out'}", "--paper_table")
    assert proc.returncode == 0, proc.stderr
    written = (tmp_path / "out" / "paper_table.md").read_text()
    assert "results from commit(s): abc123" in written and text in written


def test_provenance_reads_a_checkout_without_writing_its_index(tmp_path):
    """`results.git_commit` (called by every run) says "-dirty" for a modified tracked file and
    leaves .git/index untouched: a plain `git status` would refresh the index under
    .git/index.lock, and a `git commit` in the same checkout during a sweep would then fail."""
    from esacl_jax.harness import results

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert results.git_commit(tmp_path) == sha
    # Same content, new mtime: the index's stat data is stale, which `git status` would refresh.
    index = tmp_path / ".git" / "index"
    os.utime(tmp_path / "a.txt", (1e9, 1e9))
    before = index.read_bytes()
    assert results.git_commit(tmp_path) == sha
    assert index.read_bytes() == before
    (tmp_path / "a.txt").write_text("two\n")
    assert results.git_commit(tmp_path) == sha + "-dirty"
    assert index.read_bytes() == before
