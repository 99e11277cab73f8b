"""Every way a run ends is clean: its background compilations are joined before the interpreter
finalizes (no "Fatal Python error", no SIGABRT), it exits with its documented status and one
line, and a restart gives the result of an uninterrupted run. The randomized soak of hundreds of
stops is `experiments/bench/soak_stops.py`; here a handful, at random moments."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from esacl_jax.harness import compilation, loop
from esacl_jax.harness.checkpoint import CheckpointError
from esacl_jax.harness.loop import train_and_evaluate
from experiments.bench import soak_stops
from experiments.configs import split_digits
from tests.conftest import REPO_ROOT


def _background_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("esacl-") and
            "compile" in t.name]


class _FakeLowered:
    def __init__(self, compiled: list[str], gate: threading.Event | None):
        self.compiled, self.gate = compiled, gate

    def compile(self) -> None:
        self.compiled.append("compiled")


class _FakeJitted:
    """`lower` blocks until `gate` is set (a long lowering); `compile` is recorded."""

    def __init__(self, gate: threading.Event | None = None):
        self.compiled: list[str] = []
        self.gate = gate

    def lower(self, *specs):
        if self.gate is not None:
            self.gate.wait(10)
        return _FakeLowered(self.compiled, self.gate)


def test_the_owner_joins_its_threads_and_stops_new_work():
    gate = threading.Event()
    slow, fast = _FakeJitted(gate), _FakeJitted()
    with compilation.owned_threads() as owner:
        assert compilation.current_owner() is owner
        compilation.BackgroundCompile(fast).wait()
        assert fast.compiled == ["compiled"]
        compilation.BackgroundCompile(slow)  # lowering: still running when the block ends
        assert len(owner.alive()) == 1
        threading.Timer(0.2, gate.set).start()
    # Left the block: the thread ended, and it skipped the compilation it had not begun.
    assert owner.alive() == [] and slow.compiled == []
    assert owner.start(lambda: None, name="late") is None  # no new work once closed
    assert compilation.current_owner() is not owner


def test_a_signal_while_joining_is_held_until_the_threads_ended(monkeypatch):
    gate = threading.Event()
    owner = compilation.BackgroundThreads()
    thread = owner.start(lambda: gate.wait(10), name="esacl-test-compile")
    joins = []
    original = threading.Thread.join

    def interrupted_once(self, timeout=None):
        joins.append(self.name)
        if len(joins) == 1:
            gate.set()
            raise KeyboardInterrupt  # what the loop's handler raises on a second Ctrl-C
        return original(self, timeout)

    monkeypatch.setattr(threading.Thread, "join", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        owner.close()
    assert not thread.is_alive() and len(joins) >= 2


def _config(method: str, num_tasks: int = 2, epochs: int = 2):
    """The config of `soak_stops.RESUMABLE` (what its command lines run)."""
    config = split_digits.get_config(method)
    config.progress = config.tensorboard = False
    config.num_tasks, config.epochs, config.steps_per_call = num_tasks, epochs, 4
    config.checkpoint, config.checkpoint_every_steps = True, 8
    if method == "esacl":
        config.esacl.mask_update_every_epochs = 1
    return config


def test_a_run_keeps_an_ignored_sigint_ignored_and_stops_on_one_sigterm():
    """A sweep's worker ignores SIGINT (its parent turns Ctrl-C into one SIGTERM): the run's
    handlers leave SIGINT ignored, so that SIGTERM is the first signal (stop at the next chunk),
    not a second one raising KeyboardInterrupt wherever the worker happens to be. Where SIGINT is
    not ignored it is taken, and a second signal interrupts at once."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with loop._StopSignals() as stops:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # handlers run between bytecodes of the main thread
            assert stops.pending() == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with loop._StopSignals() as stops:
            assert signal.getsignal(signal.SIGINT) == stops._handle
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stops.pending() == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


_GC_INTERRUPT = """
import contextlib, gc, os, signal, sys, time
from esacl_jax.harness import interrupts
raised = []
def handler(signum, frame):
    raised.append(signum)
    raise KeyboardInterrupt
def callback(phase, info):
    if phase == "start" and not raised:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs at one of these bytecodes
            pass
signal.signal(signal.SIGINT, handler)
gc.callbacks.append(callback)
caught = False
with interrupts.redelivered() if sys.argv[1] == "1" else contextlib.nullcontext():
    try:
        gc.collect()
        time.sleep(2)
    except KeyboardInterrupt:
        caught = True
print("caught" if caught else "lost")
"""


@pytest.mark.parametrize("redeliver", [True, False])
def test_an_interrupt_raised_inside_a_gc_callback_is_raised_again_outside(redeliver):
    """Ctrl-C whose handler raises inside a garbage-collection callback (JAX has one): Python
    prints "Exception ignored" and drops it (a sweep then ran on to exit 0). Under
    `interrupts.redelivered()` nothing is printed and the interrupt is raised again outside
    the callback. In a fresh interpreter (pytest installs its own unraisable hook)."""
    out = subprocess.run([sys.executable, "-c", _GC_INTERRUPT, "1" if redeliver else "0"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ("caught" if redeliver else "lost")
    assert ("Exception ignored" in out.stderr) != redeliver, out.stderr[-2000:]


def test_progress_bars_create_no_multiprocessing_semaphore():
    """A run's progress bars (on or off) take a thread lock, not tqdm's default multiprocessing
    RLock: a named semaphore that a sweep worker stopped by SIGTERM leaves behind, and that
    multiprocessing's resource tracker then reports on stderr under the sweep's one-line exit.
    In a fresh process, since tqdm's lock is process-wide."""
    code = (
        "import multiprocessing.synchronize as s\n"
        "made = []\n"
        "init = s.SemLock.__init__\n"
        "def counting(self, *a, **k):\n"
        "    init(self, *a, **k)\n"
        "    made.append(type(self).__name__)\n"
        "s.SemLock.__init__ = counting\n"
        "from esacl_jax.harness.loop import progress_bar\n"
        "for disable in (True, False):\n"
        "    progress_bar(total=2, disable=disable).close()\n"
        "print(made)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_a_run_that_fails_early_leaves_no_background_thread(tmp_path):
    """A damaged checkpoint found while the chunk and the prediction still compile."""
    train_and_evaluate(_config("esacl", 1, 1), tmp_path / "done")  # a checkpoint to damage
    source = tmp_path / "done" / "checkpoints"
    for path in source.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    before = _background_threads()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        train_and_evaluate(_config("esacl", 1, 1), tmp_path / "done")
    assert _background_threads() == before == []


def _stderr_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.slow
def test_corrupted_checkpoints_exit_1_with_two_lines(tmp_path):
    """The reported crash: a SIGKILLed run's checkpoints corrupted, the same command exits 1
    with the stale-lock warning and the line naming the folder to delete (it aborted with
    SIGABRT while a background compilation ran)."""
    workdir = tmp_path / "run"
    env = soak_stops.environment(None)
    proc = soak_stops.start(soak_stops.main_command(workdir, "esacl"), env)
    assert soak_stops.wait_for_checkpoints(workdir, proc, 1), proc.communicate()
    proc.send_signal(signal.SIGKILL)
    soak_stops.finish(proc)
    soak_stops.corrupt_checkpoints(workdir)
    ended = soak_stops.run(soak_stops.main_command(workdir, "esacl"), env)
    assert ended.status == 1, ended.err
    assert len(ended.lines) == 2, ended.err
    assert ended.lines[0].startswith("warning: taking over the stale lock")
    assert ended.lines[1].startswith("error: no usable checkpoint") and \
        ended.lines[1].endswith("to start the run over")


@pytest.mark.slow
def test_runs_stopped_at_random_moments_end_cleanly_and_resume(tmp_path):
    """A stop of a random method (over runs of the suite, every method and way), a random way at
    a random moment of the first 6 s: documented status and lines, and the restart equal to an
    uninterrupted run (experiments/bench/soak_stops.py runs hundreds)."""
    rng = random.Random()
    method = rng.choice(soak_stops.METHODS)
    train_and_evaluate(_config(method), tmp_path / "reference")
    expected = soak_stops.matrices(tmp_path / "reference")
    fast = ("sigint", "sigterm", "sigkill", "write_error", "nan")
    begin = time.monotonic()
    for _ in range(1):
        record = soak_stops.stop_once(rng.choice(fast), method, rng, tmp_path,
                                      {method: expected}, 6.0, None)
        assert record["problems"] == [], record
    assert time.monotonic() - begin < 300


@pytest.mark.parametrize("failing, after", [("write", 3), ("flush", 0)])
def test_a_tensorboard_write_error_is_one_line_and_no_results(tmp_path, monkeypatch, failing,
                                                              after):
    """A full disk under the workdir while TensorBoard logs: one line, results.json unwritten
    (tensorboardX's own writer thread printed a traceback and then blocked the run)."""
    import errno

    from tensorboardX import record_writer

    from esacl_jax.harness.atomic_io import WriteError

    calls = {"n": 0}
    original = getattr(record_writer.RecordWriter, failing)

    def full_disk(self, *args):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args)

    monkeypatch.setattr(record_writer.RecordWriter, failing, full_disk)
    config = _config("derpp", 1, 1)
    config.tensorboard, config.checkpoint = True, False
    with pytest.raises(WriteError) as info:
        train_and_evaluate(config, tmp_path)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    assert "TensorBoard" in message and "--config.tensorboard=False" in message
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / ".lock").exists() and _background_threads() == []


def _descendants(pid: int) -> set[int]:
    """The live processes below `pid` (from /proc: each process's parent)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_ctrl_c_of_a_local_sweep_leaves_no_process_and_the_command_resumes(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) at a random moment of
    a two-worker comparison's first seconds: exit 130 and one line (or 0 when it was done),
    every process it started has ended, and the same command finishes the sweep. The pool is
    drawn at random (both over runs of the suite): "spawn" workers, or a fresh process per
    run (--isolate)."""
    isolate = random.choice([False, True])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "experiments.compare", "--benchmarks=split_digits",
               "--methods=finetune", "--sparsities=0.9", "--seeds=0,1", "--epochs=1",
               "--max_train_per_task=100", "--jobs=2", f"--isolate={isolate}", f"--out={out}"]
    env = {**soak_stops.environment(None), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: set[int] = set()
    deadline = time.monotonic() + random.uniform(1.0, 8.0)
    while time.monotonic() < deadline and proc.poll() is None:
        seen |= _descendants(proc.pid)
        time.sleep(0.05)
    seen |= _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    _, err = proc.communicate(timeout=120)
    lines = _stderr_lines(err)
    assert proc.returncode in (0, 130), err
    assert not any(marker in err for marker in soak_stops.ABORT_MARKERS), err
    if proc.returncode == 130:
        assert len(lines) == 1 and lines[0].startswith("interrupted by SIGINT"), err
    end = time.monotonic() + 20
    while [p for p in seen if _alive(p)] and time.monotonic() < end:
        time.sleep(0.1)
    assert [p for p in seen if _alive(p)] == [], f"left behind of {sorted(seen)} ({isolate=})"
    again = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert len(list(out.rglob("results.json"))) == 2
