"""The Ray launcher: every run of a sweep is a Ray task (`run_all(..., launcher="ray")`).

What stays on the driver (the process calling `run_all`): the plan, the resume rules (a run
with a results.json of its config is skipped, one made with another config is refused, never
reused: `reuse.check_existing`), the data check, the progress lines and the `SweepResult`. What
goes to the cluster: `execute(run)`, one task per run, asking ``cpus_per_run`` CPUs and
``gpus_per_run`` GPUs (the configs name no device: a ResNet protocol on GPUs wants
``--ray_gpus_per_run=1``). A task asking no GPU runs JAX on the CPU (``JAX_PLATFORMS=cpu``), so
CPU runs never take the memory of a GPU on their node. The runs' workdirs (the sweep's --out)
and the data must be on storage every node reads at the same path.

Ray itself: without an address a private local Ray instance is started with ``jobs x
cpus_per_run`` CPUs and stopped at the end; with one (``auto``, ``HOST:PORT``) the cluster
started by ``ray start`` is joined. A process that already holds a Ray session (tests) uses it.
Workers run the Python the cluster was started with: the same virtualenv on every node, with
this package installed (nothing is uploaded: no runtime_env working_dir).

Faults:

- a worker process that dies mid-run (killed, out of memory, its node lost) is retried by Ray
  up to `MAX_RETRIES` times. The retry resumes from the run's own checkpoint when its config
  checkpoints (``config.checkpoint``; `esacl_jax.harness.checkpoint`), else starts the run over;
  either way its results equal an uninterrupted run's. The dead attempt's workdir lock is
  released by the retry (the lock names a pid that may be on another host).
- a run that fails on its own (bad config, NaN, missing data) returns a "failed" `Outcome` from
  `execute`: reported on one line, never retried.
- KeyboardInterrupt (Ctrl-C) on the driver cancels every outstanding task with
  ``ray.cancel(force=True)`` (a running task's worker process is killed), waits for the
  cancellations and re-raises: no run goes on behind the sweep, and the same command resumes
  it (finished runs skipped; an interrupted run resumes from its checkpoint when it has one).

Every attempt of a run is recorded in ``workdir/ray_task.json`` (the Ray task id and, per
attempt, host, ip, Ray node id, pid, start time); the finished run's results.json records the
node that ran it (``"node"``). Ray is imported only here, and only when the launcher is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from esacl_jax.harness.sweep.plan import Outcome, Run, describe_node, one_line

MAX_RETRIES = 3  # Ray's max_retries: tries after the first when the worker process dies
TASK_FILE = "ray_task.json"  # per workdir: the attempts of the run's Ray task
_CANCEL_WAIT_S = 10.0  # how long an interrupted driver waits for its cancellations to land
_PASSED_ENV = ("ESACL_DATA_DIR", "TFDS_DATA_DIR")  # the driver's values go to every task


def require_ray() -> Any:
    """The ray module, or ValueError (one line) saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ValueError("--launcher=ray needs Ray, which is not installed here: "
                         "pip install -e '.[cluster]' (or pip install 'ray>=2.40')") from err
    return ray


# --------------------------------------------------------------------------------------------
# On the worker


def _record_attempt(workdir: pathlib.Path, task_id: str, attempt: dict) -> int:
    """Appends `attempt` to workdir/ray_task.json (a file of another task id starts over) and
    releases the workdir lock a dead earlier attempt of this task left; returns the attempt
    number (1 for the first)."""
    from esacl_jax.harness.atomic_io import write_json_atomic

    path = workdir / TASK_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    attempts = list(record.get("attempts") or []) if record.get("task_id") == task_id else []
    if attempts:
        _release_lock_of(workdir, attempts[-1])
    attempts.append(attempt)
    write_json_atomic(path, {"task_id": task_id, "attempts": attempts})
    return len(attempts)


def _release_lock_of(workdir: pathlib.Path, attempt: dict) -> None:
    """Removes workdir/.lock when the earlier attempt `attempt` of this task holds it: Ray
    retries a task only after its worker process died, so that lock is stale even when it
    names a pid on another host (which `atomic_io.WorkdirLock` cannot check)."""
    lock = workdir / ".lock"
    try:
        owner = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if owner.get("pid") == attempt.get("pid") and owner.get("host") == attempt.get("hostname"):
        lock.unlink(missing_ok=True)


def _run_task(run: Run, data_dir: str | None) -> Outcome:
    """The Ray task: records the attempt, then `execute`s the run (which never raises)."""
    import ray

    from esacl_jax.harness.sweep.run_one import execute

    context = ray.get_runtime_context()
    node = {"launcher": "ray", "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(), "ray_node_id": context.get_node_id()}
    try:
        attempt = _record_attempt(pathlib.Path(run.workdir), context.get_task_id(), {
            **node, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except Exception as err:  # noqa: BLE001 - e.g. an unwritable workdir: this run's failure
        return Outcome(run, "failed", error=one_line(err), node=describe_node(node))
    outcome = execute(run, data_dir, node={**node, "attempts": attempt})
    return dataclasses.replace(outcome, node=describe_node(node), attempts=attempt)


# --------------------------------------------------------------------------------------------
# On the driver


def _system_failure(ray: Any, err: BaseException) -> str:
    """One line for a task Ray could not complete (the run's own errors never get here)."""
    name = type(err).__name__
    if isinstance(err, ray.exceptions.TaskCancelledError):
        return "its Ray task was cancelled"
    if isinstance(err, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.LocalRayletDiedError, ray.exceptions.OutOfMemoryError)):
        return (f"its Ray worker process died and Ray's retries (max_retries={MAX_RETRIES}) "
                f"are used up ({name}); the worker logs are in the Ray session's logs folder")
    text = " ".join(str(err).split())
    return f"Ray task failed: {name}: {text[:200]}" if text else f"Ray task failed: {name}"


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """OSError unless a HOST:PORT address accepts a TCP connection. Ray itself retries an
    unreachable address for many minutes; other forms ("auto", ray://) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address or not host:
        return
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
        pass


class RaySession:
    """A Ray connection for one sweep: ``with RaySession(...) as s: s.run(todo, printer)``.

    Starts a local Ray instance (no `address`), joins a cluster (`address`), or uses this
    process's Ray session when one is initialized; only an instance it started is shut down on
    exit. ValueError (one line) when Ray cannot start or be reached, or when no node has the
    resources one run asks.
    """

    def __init__(self, address: str | None, jobs: int, cpus_per_run: float,
                 gpus_per_run: float, isolate: bool, data_dir: str | None):
        self.ray = require_ray()
        self.address, self.jobs, self.isolate = address, jobs, isolate
        self.cpus_per_run, self.gpus_per_run = float(cpus_per_run), float(gpus_per_run)
        # The workers' working directory is not the driver's on a cluster: absolute paths.
        self.data_dir = str(pathlib.Path(data_dir).resolve()) if data_dir else None
        self.started = False
        self.where = ""
        self.resources: dict[str, float] = {}
        self.nodes = 0

    def __enter__(self) -> RaySession:
        ray = self.ray
        if ray.is_initialized():
            self.where = "this process's Ray session"
        else:
            kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
            try:
                if self.address:
                    _check_reachable(self.address)
                    ray.init(address=self.address, **kwargs)
                    self.where = f"the Ray cluster at {self.address}"
                else:
                    ray.init(address="local", num_cpus=max(1, math.ceil(
                        self.jobs * self.cpus_per_run)), include_dashboard=False, **kwargs)
                    self.where = "a local Ray instance"
            except Exception as err:  # noqa: BLE001 - Ray raises several kinds
                what = f"reach the Ray cluster at {self.address}" if self.address else \
                    "start a local Ray instance"
                raise ValueError(f"cannot {what}: {one_line(err)}") from err
            self.started = True
        try:
            self.resources = {k: float(v) for k, v in ray.cluster_resources().items()}
            self.nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            if self.concurrency < 1:
                raise ValueError(
                    f"{self.where} has {self._resources_text()}: too few for one run of "
                    f"{self.cpus_per_run:g} CPU(s) and {self.gpus_per_run:g} GPU(s) "
                    "(--ray_cpus_per_run, --ray_gpus_per_run)")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    @property
    def concurrency(self) -> int:
        """Runs the cluster's resources allow at a time (all of its nodes together)."""
        limit = self.resources.get("CPU", 0.0) / self.cpus_per_run
        if self.gpus_per_run > 0:
            limit = min(limit, self.resources.get("GPU", 0.0) / self.gpus_per_run)
        return int(limit + 1e-9)

    def _resources_text(self) -> str:
        return (f"{self.nodes} node(s), {self.resources.get('CPU', 0):g} CPUs, "
                f"{self.resources.get('GPU', 0):g} GPUs")

    def describe(self) -> str:
        fresh = "; a fresh worker process per run" if self.isolate else ""
        return (f"Ray tasks of {self.cpus_per_run:g} CPU, {self.gpus_per_run:g} GPU on "
                f"{self.where}: {self._resources_text()}{fresh}")

    def _environment(self) -> dict[str, str]:
        """The tasks' environment variables: the driver's data locations; JAX on the CPU for a
        run asking no GPU; a run sharing a GPU preallocates its share of JAX's default 75%."""
        env = {name: os.environ[name] for name in _PASSED_ENV if os.environ.get(name)}
        if self.gpus_per_run == 0:
            env["JAX_PLATFORMS"] = "cpu"
        elif self.gpus_per_run < 1:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.75 * self.gpus_per_run:.3f}"
        return env

    def run(self, todo: Sequence[tuple[int, Run]], printer: Any) -> dict[int, Outcome]:
        """Submits every run, then collects outcomes as they finish (`printer` gets each).
        KeyboardInterrupt cancels the outstanding tasks (see the module docstring)."""
        ray = self.ray
        options: dict[str, Any] = dict(
            num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run, max_retries=MAX_RETRIES,
            retry_exceptions=False, runtime_env={"env_vars": self._environment()})
        if self.isolate:
            options["max_calls"] = 1  # the worker process exits after its run
        task = ray.remote(**options)(_run_task)
        pending: dict[Any, tuple[int, Run]] = {}
        outcomes: dict[int, Outcome] = {}
        try:
            for i, run in todo:
                shipped = dataclasses.replace(run, workdir=pathlib.Path(run.workdir).resolve())
                pending[task.remote(shipped, self.data_dir)] = (i, run)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    i, run = pending.pop(ref)
                    try:
                        outcome = dataclasses.replace(ray.get(ref), run=run)
                    except ray.exceptions.RayError as err:
                        outcome = Outcome(run, "failed", error=_system_failure(ray, err))
                    outcomes[i] = outcome
                    printer(outcome)
        except KeyboardInterrupt:
            self._cancel(pending)
            raise
        return outcomes

    def _cancel(self, pending: dict[Any, tuple[int, Run]]) -> None:
        """Force-cancels the `pending` tasks (killing the workers of running ones), waits for
        it, and releases the workdir locks their killed attempts left (so that the resumed
        sweep can run them on any node)."""
        ray = self.ray
        refs = list(pending)
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - finished meanwhile, or Ray is going down
                pass
        stopped = []
        if refs:
            try:
                stopped, _ = ray.wait(refs, num_returns=len(refs), timeout=_CANCEL_WAIT_S)
            except Exception:  # noqa: BLE001 - Ray is going down: its shutdown stops them
                stopped = []
        for ref in stopped:
            workdir = pathlib.Path(pending[ref][1].workdir).resolve()
            try:
                record = json.loads((workdir / TASK_FILE).read_text(encoding="utf-8"))
                if record.get("task_id") == ref.task_id().hex() and record.get("attempts"):
                    _release_lock_of(workdir, record["attempts"][-1])
            except (OSError, ValueError, AttributeError):
                continue  # never started (no record) or unreadable: nothing to release
        print(f"interrupted: cancelled {len(refs)} outstanding Ray task(s) of the sweep "
              "(force: their worker processes were stopped)", file=sys.stderr, flush=True)
