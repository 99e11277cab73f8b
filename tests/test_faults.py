"""Faults an operator meets, each ending in one clear line: damaged checkpoints, a full or
read-only workdir, two runs on one workdir, a typo'd config field, signals and SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esacl_jax.harness import atomic_io
from esacl_jax.harness import loop as loop_lib
from esacl_jax.harness.checkpoint import CheckpointError, RunCheckpointer
from tests.conftest import REPO_ROOT

CONFIG_FILE = "experiments/configs/split_digits.py"


def small_state(value: float) -> dict:
    """Incompressible weights, so the largest stored file holds them."""
    w = jax.random.normal(jax.random.key(100), (64, 32)) + value
    return {"w": w, "step": jnp.asarray(3, jnp.int32), "rng": jax.random.key(7)}


def three_checkpoints(directory: pathlib.Path) -> RunCheckpointer:
    ckpt = RunCheckpointer(directory, {"lr": 0.1})
    for n in range(3):
        ckpt.save(small_state(float(n)), {"n": n})
    return ckpt


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_only_the_last_two_checkpoints_are_kept_and_restore_is_verified(tmp_path):
    ckpt = three_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    state, progress = ckpt.restore(small_state(0.0))
    assert progress["n"] == 2
    np.testing.assert_array_equal(state["w"], small_state(2.0)["w"])
    assert jax.random.key_data(state["rng"]).tolist() == \
        jax.random.key_data(jax.random.key(7)).tolist()


def _largest_state_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flipped_bit", "bytes_overwritten", "checksum", "json"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, capfd, damage):
    three_checkpoints(tmp_path)
    latest = tmp_path / "2"
    if damage == "json":  # the progress file cut short
        path = latest / "progress" / "metadata"
        path.write_text(path.read_text()[:12])
    elif damage == "checksum":  # the arrays intact, the recorded checksum another one
        path = latest / "progress" / "metadata"
        payload = json.loads(path.read_text())
        payload["state_sha256"] = "0" * 64
        path.write_text(json.dumps(payload))
    else:
        path = _largest_state_file(latest)
        data = bytearray(path.read_bytes())
        if damage == "flipped_bit":
            data[len(data) // 2] ^= 0x01
        else:
            data[len(data) // 3: len(data) // 3 + 64] = b"\x7f" * 64
        path.write_bytes(bytes(data))
    capfd.readouterr()
    state, progress = RunCheckpointer(tmp_path, {"lr": 0.1}).restore(small_state(0.0))
    assert progress["n"] == 1
    np.testing.assert_array_equal(state["w"], small_state(1.0)["w"])
    warning = one_line(capfd.readouterr().err)
    assert warning.startswith("warning: checkpoint ") and str(latest) in warning
    # One short line, whatever the length of pytest's temporary path (named twice in it).
    assert "damaged" in warning and len(warning.replace(str(tmp_path), "DIR")) < 300
    assert not latest.exists()  # so the next saves keep a good checkpoint to fall back to


@pytest.mark.parametrize("kept", [2, 3])
def test_no_good_checkpoint_names_the_file_and_what_to_delete(tmp_path, capfd, kept):
    """One line and no warnings before it, also with three checkpoints on disk (what a SIGKILL
    between a save and the removal of the oldest leaves)."""
    three_checkpoints(tmp_path)
    if kept == 3:
        shutil.copytree(tmp_path / "1", tmp_path / "0")
    for step in ("0", "1", "2")[3 - kept:]:
        (tmp_path / step / "progress" / "metadata").write_text('{"n": "unterminated')
    capfd.readouterr()
    with pytest.raises(CheckpointError) as info:
        RunCheckpointer(tmp_path, {"lr": 0.1}).restore(small_state(0.0))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "2") in message
    assert f"delete {tmp_path}" in message
    assert f"and the {kept - 1} older one" in message
    assert capfd.readouterr().err == ""


def test_disk_full_during_a_checkpoint_removes_the_partial_folder(tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    ckpt = RunCheckpointer(tmp_path, {"lr": 0.1})
    ckpt.save(small_state(1.0), {"n": 0})

    async def disk_full(self, x, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    with pytest.raises(atomic_io.WriteError) as info:
        ckpt.save(small_state(2.0), {"n": 1})
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    assert str(tmp_path / "1") in message and "previous checkpoint" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0"]
    monkeypatch.undo()
    assert RunCheckpointer(tmp_path, {"lr": 0.1}).restore(small_state(0.0))[1]["n"] == 0


def _digits_config(**overrides):
    from experiments.configs import split_digits

    config = split_digits.get_config("finetune")
    config.progress = config.tensorboard = False
    config.num_tasks, config.epochs = 2, 1
    for key, value in overrides.items():
        config[key] = value
    return config


def test_unwritable_workdir_fails_before_loading_data(tmp_path, monkeypatch):
    def no_data(config):
        raise AssertionError("data loaded before the workdir was checked")

    monkeypatch.setattr(loop_lib, "load_config_benchmark", no_data)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(atomic_io.WriteError) as info:
        loop_lib.train_and_evaluate(_digits_config(), blocker / "workdir")
    assert "\n" not in str(info.value) and str(blocker / "workdir") in str(info.value)

    def full(path):
        return type("usage", (), {"free": 1 << 20})()

    monkeypatch.setattr(atomic_io.shutil, "disk_usage", full)
    with pytest.raises(atomic_io.WriteError, match="MiB free"):
        loop_lib.train_and_evaluate(_digits_config(), tmp_path / "workdir")


def test_results_write_failure_keeps_the_results(tmp_path, monkeypatch):
    real = atomic_io.write_bytes_atomic

    def read_only(path, data):
        if pathlib.Path(path).name == "results.json":
            raise atomic_io.WriteError(f"cannot write {path}: Read-only file system")
        return real(path, data)

    monkeypatch.setattr(atomic_io, "write_bytes_atomic", read_only)
    with pytest.raises(atomic_io.WriteError) as info:
        loop_lib.train_and_evaluate(_digits_config(num_tasks=1), tmp_path)
    assert info.value.result["class_il_matrix"].shape == (1, 1)
    assert not (tmp_path / ".lock").exists()


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path, capfd):
    with atomic_io.WorkdirLock(tmp_path):
        with pytest.raises(atomic_io.WorkdirBusyError) as info:
            atomic_io.WorkdirLock(tmp_path).acquire()
        message = str(info.value)
        assert "\n" not in message and f"pid {os.getpid()}" in message
    assert not (tmp_path / ".lock").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "command": "old run"}))
    capfd.readouterr()
    with atomic_io.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert "stale lock" in one_line(capfd.readouterr().err)


def _main(workdir: pathlib.Path, *args: str, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "experiments.main", f"--config={CONFIG_FILE}",
               f"--workdir={workdir}", "--config.progress=False", "--config.tensorboard=False",
               *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_typo_in_a_config_field_is_one_line_with_a_suggestion(tmp_path):
    proc = _main(tmp_path, "--config.sparsty=0.9")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) <= 3 and "did you mean" in err and "esacl.sparsity" in err, err


def test_second_run_on_a_workdir_is_refused_in_one_line(tmp_path):
    lock = atomic_io.WorkdirLock(tmp_path)
    lock.acquire()
    try:
        proc = _main(tmp_path, "--config.num_tasks=1")
        _, err = proc.communicate(timeout=300)
    finally:
        lock.release()
    assert proc.returncode == 1
    assert one_line(err).startswith("error: workdir ") and f"pid {os.getpid()}" in err


# Resumption: 2 tasks x 2 epochs of 26 steps, chunks of 4 steps, a checkpoint every 8 steps
# (about 15 checkpoints in a run).
RESUMABLE = ("--config.num_tasks=2", "--config.epochs=2", "--config.steps_per_call=4",
             "--config.checkpoint=True", "--config.checkpoint_every_steps=8")


def _wait_for_checkpoint(workdir: pathlib.Path, proc: subprocess.Popen, count: int) -> None:
    """Waits until `count` checkpoints were written (their numbers are 0, 1, ...)."""
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints" / str(count - 1)).is_dir():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _matrices(workdir: pathlib.Path) -> tuple[list, list]:
    result = json.loads((workdir / "results.json").read_text())
    return result["class_il_matrix"], result["task_il_matrix"]


def test_sigkill_and_sigterm_mid_task_resume_to_identical_matrices(tmp_path):
    reference = _main(tmp_path / "reference", *RESUMABLE)
    interrupted = tmp_path / "interrupted"
    proc = _main(interrupted, *RESUMABLE)
    # SIGKILL after a random number of checkpoints (the kill may land mid-write).
    count = random.Random().randint(1, 6)
    _wait_for_checkpoint(interrupted, proc, count)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (interrupted / "results.json").exists()

    # SIGTERM: saves at the next chunk boundary, one line, exit 143.
    written = max(int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit())
    proc = _main(interrupted, *RESUMABLE)
    _wait_for_checkpoint(interrupted, proc, written + 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    # Warnings first (the SIGKILLed run's lock; a checkpoint the kill cut short), then one line.
    *warnings, line = err.strip().splitlines()
    assert warnings[0].startswith("warning: taking over the stale lock"), err
    assert all(w.startswith("warning: ") for w in warnings), err
    assert line.startswith("interrupted by SIGTERM") and "resumes" in line
    latest = max(int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit())
    progress = json.loads((interrupted / "checkpoints" / str(latest) / "progress" /
                           "metadata").read_text())
    assert progress["in_task"] is not None or progress["tasks_done"] < 2

    proc = _main(interrupted, *RESUMABLE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    reference.communicate(timeout=300)
    assert reference.returncode == 0
    assert _matrices(interrupted) == _matrices(tmp_path / "reference"), f"killed after {count}"
    result = json.loads((interrupted / "results.json").read_text())
    assert result["wall_time_s"] > progress["wall_time_s"]  # accumulated across processes
    assert not (interrupted / ".lock").exists()


def test_too_little_space_for_checkpoints_is_one_line(tmp_path, monkeypatch):
    ckpt = RunCheckpointer(tmp_path, {"lr": 0.1})
    monkeypatch.setattr("esacl_jax.harness.checkpoint.shutil.disk_usage",
                        lambda path: type("usage", (), {"free": 1000})())
    with pytest.raises(atomic_io.WriteError, match="need about") as info:
        ckpt.check_space(small_state(0.0))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
