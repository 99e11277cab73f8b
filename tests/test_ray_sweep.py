"""The Ray launcher (`run_all(..., launcher="ray")`) on one local Ray cluster of two workers.

One Ray instance serves the whole module (ray.init(num_cpus=2)); every sweep is split_digits at
test_sweeps' tiny settings (1 epoch, 100 examples per task), and the local launcher's results of
the same runs (computed once, in this process) are the reference. The tests skip, with one
reason, only where Ray cannot be imported or cannot start.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from esacl_jax.harness import sweep
from esacl_jax.harness.atomic_io import _pid_alive
from experiments import compare
from tests.conftest import REPO_ROOT

TINY = dict(benchmarks=("split_digits",), methods=("finetune", "er"), sparsities=(0.9,),
            seeds=(0, 1), jobs=2, epochs=1, max_train_per_task=100, isolate=False)
TIMEOUT_S = 90  # for any one wait below (the machine may be loaded)


def _settings(out, **kw) -> compare.Settings:
    return compare.Settings(**{**TINY, "out": str(out), **kw})


def _runs(out, **kw) -> list[sweep.Run]:
    settings = _settings(out, **kw)
    return compare.plan(settings, list(settings.methods))


def _results(run: sweep.Run) -> dict:
    return json.loads(run.results_path.read_text(encoding="utf-8"))


def _matrices(run: sweep.Run) -> tuple:
    result = _results(run)
    return result["class_il_matrix"], result["task_il_matrix"]


def _attempts(run: sweep.Run, grouped: bool = False) -> list[dict]:
    """The Ray attempts of `run` (`grouped`: of the seed group it ran in, in its parent)."""
    workdir = pathlib.Path(run.workdir)
    path = (workdir.parent if grouped else workdir) / "ray_task.json"
    return json.loads(path.read_text(encoding="utf-8"))["attempts"]


def _wait_for(condition, what: str, timeout_s: float = TIMEOUT_S, poll_s: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """`values` in os.environ while the block runs (processes started then inherit them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> dict[str, str]:
    """A persistent JAX compilation cache shared by the module's worker processes (the local
    launcher's pool and the Ray workers), so that runs of the same shapes compile once: the test
    budget, not a launcher feature (results do not depend on it; this process never uses it)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def ray_address(compile_cache):
    """A local Ray cluster with two worker CPUs for the module; yields its address."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[cluster]')")
    try:
        with _environ(compile_cache):  # the cluster's processes inherit it
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False)
    except Exception as err:  # noqa: BLE001 - any reason Ray cannot start here
        pytest.skip(f"cannot start a local Ray cluster: {sweep.one_line(err)}")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(compile_cache, tmp_path_factory) -> pathlib.Path:
    """The tiny sweep (finetune and er, seeds 0 and 1) run by the local launcher: two "spawn"
    worker processes, one run per seed (no seed groups)."""
    out = tmp_path_factory.mktemp("local")
    with _environ(compile_cache):
        result = sweep.run_all(_runs(out), jobs=2, progress=False, group=False)
    assert result.count("done") == 4, result.failed
    return out


# ----- no cluster needed -----


def test_launcher_settings_fail_with_one_line(tmp_path, monkeypatch, capsys):
    runs = _runs(tmp_path)
    with pytest.raises(ValueError, match="unknown launcher 'slurm'; choose from local, ray"):
        sweep.run_all(runs, launcher="slurm")
    with pytest.raises(ValueError, match="--ray_address needs --launcher=ray"):
        sweep.run_all(runs, ray_address="auto")
    with pytest.raises(ValueError, match="--ray_gpus_per_run needs --launcher=ray"):
        sweep.run_all(runs, ray_gpus_per_run=1)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(SystemExit) as stop:
        sweep.exit_with(lambda: sweep.run_all(runs, launcher="ray"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --launcher=ray needs Ray") and err.count("\n") == 1
    assert "pip install -e '.[cluster]'" in err
    assert not any(tmp_path.iterdir())  # nothing ran
    command = _settings("runs/x", launcher="ray", ray_address="auto",
                        ray_gpus_per_run=1).command()
    assert "--launcher=ray --ray_address=auto --ray_gpus_per_run=1" in command
    assert "--launcher" not in _settings("runs/x").command()


def test_an_unreachable_cluster_fails_fast_with_one_line(tmp_path, monkeypatch):
    """Ray would retry an address nobody listens on for minutes: one line at once instead."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[cluster]')")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # even beside the module's session
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"^cannot reach the Ray cluster at 127\.0\.0\.1:1: "
                       r"ConnectionRefusedError"):
        sweep.run_all(_runs(tmp_path), launcher="ray", ray_address="127.0.0.1:1")
    assert time.monotonic() - start < 30


# ----- on the module's Ray cluster -----


def test_ray_sweep_gives_the_local_results(ray_address, reference, tmp_path):
    """Same runs, same accuracy matrices (the Ray sweep runs each cell's seeds as one seed
    group, the reference each seed alone); one progress line per group with its node and an
    ETA; results.json and the report's provenance say which node ran each run."""
    stream = io.StringIO()
    runs = _runs(tmp_path)
    result = sweep.run_all(runs, jobs=2, launcher="ray", stream=stream)
    assert result.exit_code == 0 and result.count("done") == 4
    for run, ref in zip(runs, _runs(reference), strict=True):
        assert _matrices(run) == _matrices(ref), run.name
    host = socket.gethostname()
    node = _results(runs[0])["node"]
    assert node["launcher"] == "ray" and node["hostname"] == host and node["attempts"] == 1
    assert node["ip"] and node["ray_node_id"]
    assert _results(_runs(reference)[0])["node"] == {"launcher": "local", "hostname": host}
    assert all(len(_attempts(run, grouped=True)) == 1 for run in runs)
    assert _results(runs[0])["seed_group"] == [0, 1]
    assert {o.node for o in result.outcomes} == {f"{host} ({node['ip']})"}

    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("sweep: 4 runs, 4 to run, 2 at a time (Ray tasks of 1 CPU, "
                               "0 GPU on this process's Ray session")
    assert "(2 seed groups: --nogroup_seeds runs each alone)" in lines[0]
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 2
    for line in progress:
        assert re.fullmatch(r"\[\d/2\] split_digits/\S+/seeds0,1  class-IL .+ task-IL .+ s  on "
                            + re.escape(f"{host} ({node['ip']})") + r"  ETA \S+", line), line
    info = sweep.provenance("cmd", "test", [_results(r) for r in runs], launcher="ray")
    assert info["nodes (Ray runs each)"] == f"{host} ({node['ip']}): 4 runs"
    assert "launcher" in info and "runs at a time (--jobs)" not in info


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(ray_address, reference,
                                                                     tmp_path):
    """SIGKILL to the worker process after the run's first checkpoint: Ray retries the task,
    the retry resumes from that checkpoint, and the matrices equal the uninterrupted run's."""
    ref = _runs(reference)[2]  # er, seed 0
    assert ref.method == "er"
    run = sweep.Run(ref.benchmark, ref.method, {**ref.overrides, "checkpoint": True},
                    ref.seed, tmp_path / "er_seed0", group=ref.group)
    workdir = pathlib.Path(run.workdir)
    seen: dict = {}

    def kill_after_first_checkpoint():
        try:
            _wait_for(lambda: (workdir / "checkpoints/0/commit_success.txt").exists(),
                      "the first checkpoint")
            seen["pid"] = _attempts(run)[0]["pid"]
            progress = json.loads((workdir / "checkpoints/0/progress/metadata").read_text())
            seen["train_time_0"] = progress["train_times"][0]
            seen["finished_before_kill"] = run.results_path.exists()
            os.kill(seen["pid"], signal.SIGKILL)
        except BaseException as err:  # noqa: BLE001 - reported by the test's thread
            seen["error"] = err

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    stream = io.StringIO()
    result = sweep.run_all([run], launcher="ray", stream=stream)
    killer.join(TIMEOUT_S)
    assert "error" not in seen, seen
    assert not seen["finished_before_kill"]
    assert result.exit_code == 0 and result.outcomes[0].attempts == 2
    assert _matrices(run) == _matrices(ref)
    # The retry restored checkpoint 0 (or a later one): task 1's timing is the killed attempt's.
    assert _results(run)["train_time_per_task_s"][0] == seen["train_time_0"]
    first, second = _attempts(run)
    assert first["pid"] == seen["pid"] != second["pid"]
    assert _results(run)["node"]["attempts"] == 2 and not (workdir / ".lock").exists()
    printed = stream.getvalue()
    assert "(attempt 2: Ray retried it after its worker died)" in printed
    assert "sweep: 1 ran, 0 skipped, 0 failed" in printed


def test_a_run_failing_on_its_own_is_reported_once_and_not_retried(ray_address, tmp_path):
    bad = sweep.Run("split_digits", "finetune", {"esacl.nope": 1}, 0, tmp_path / "bad")
    stream = io.StringIO()
    result = sweep.run_all([bad], launcher="ray", stream=stream)
    assert result.exit_code == 1 and result.outcomes[0].attempts == 1
    assert len(_attempts(bad)) == 1
    failed = [line for line in stream.getvalue().splitlines() if "FAILED" in line]
    assert len(failed) == 1
    assert re.fullmatch(r"\[1/1\] FAILED split_digits/finetune/seed0 on \S+ \(\S+\): KeyError: "
                        r".*no field 'nope'.*", failed[0]), failed[0]


def test_ctrl_c_cancels_the_outstanding_runs_and_the_same_command_resumes(
        ray_address, reference, tmp_path):
    """SIGINT to a comparison on the cluster: exit 130, its running tasks' worker processes are
    gone and no run finishes afterwards; the sweep then resumes (finished runs skipped)."""
    out = tmp_path / "out"
    for seed in (0, 1):  # two finished runs, from the reference
        shutil.copytree(reference / f"split_digits/finetune/seed{seed}",
                        out / f"split_digits/finetune/seed{seed}")
    # Checkpointing (a field that does not change the computation, so the copied runs still
    # count) makes the runs long enough to be interrupted while they hold their workdir locks.
    settings = _settings(out, methods=("finetune",), seeds=(0, 1, 2, 3), isolate=True,
                         launcher="ray", ray_address=ray_address, overrides=("checkpoint=True",))
    runs = compare.plan(settings, ["finetune"])
    todo = runs[2:]
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.compare", "--benchmarks=split_digits",
         "--methods=finetune", "--sparsities=0.9", "--seeds=0,1,2,3", "--epochs=1",
         "--max_train_per_task=100", f"--out={out}", "--set=checkpoint=True",
         "--launcher=ray", f"--ray_address={ray_address}", "--nogroup_seeds"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def running(run: sweep.Run) -> bool:
        return (pathlib.Path(run.workdir) / ".lock").exists() or run.results_path.exists()

    try:
        _wait_for(lambda: all(running(r) for r in todo) or proc.poll() is not None,
                  "both runs to start")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "skipping 2 with results.json" in stdout
    unfinished = [r for r in todo if not r.results_path.exists()]
    assert unfinished, "both runs finished before the interrupt"
    assert f"interrupted: cancelled {len(unfinished)} outstanding Ray task(s)" in stderr
    assert "rerun the same command to resume" in stderr
    pids = [_attempts(r)[-1]["pid"] for r in unfinished]
    _wait_for(lambda: not any(_pid_alive(pid) for pid in pids), "the cancelled workers to exit",
              timeout_s=20)
    time.sleep(1.0)
    assert not any(r.results_path.exists() for r in unfinished)  # nothing went on
    # The killed attempts' workdir locks are released (a resumed run may land on another node).
    assert not any((pathlib.Path(r.workdir) / ".lock").exists() for r in unfinished)

    stream = io.StringIO()
    result = sweep.run_all(runs, launcher="ray", isolate=False, stream=stream, group=False)
    assert result.exit_code == 0
    assert result.count("skipped") == 4 - len(unfinished)
    assert result.count("done") == len(unfinished)
    assert f"skipping {4 - len(unfinished)} with results.json" in stream.getvalue()
    assert _matrices(runs[0]) == _matrices(_runs(reference)[0])
