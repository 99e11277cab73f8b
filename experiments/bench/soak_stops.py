"""Stops runs at random moments and checks that every one ends cleanly and resumes correctly.

    python -m experiments.bench.soak_stops --stops=200 --out=docs/robustness/soak_stops.json

writes the counts to the JSON file after every stop (a soak cut short keeps them) and, at the
end, the same counts as a table beside it (soak_stops.md, with the command, commit and machine;
`--render=JSON` rebuilds that table from the JSON alone).

Each stop starts `experiments.main` (split_digits, 2 tasks x 2 epochs, a checkpoint every 8
steps, no persistent compilation cache: every program compiles, in the background threads too),
for DER++ or EsaCL at random, and ends it in one of these ways, at random:

- ``sigint`` / ``sigterm``: the signal at a random moment of the run (its first seconds
  included: imports, compilation); expected exit 130 / 143 with at most two lines on stderr
  (or 0 when the run was already done), then the same command resumes to exit 0;
- ``sigkill``: SIGKILL at a random moment, then the same command (exit 0);
- ``corrupt``: SIGKILL after a random number of checkpoints, every checkpoint file
  overwritten, then the same command: exit 1 with "no usable checkpoint" (the stale-lock
  warning before it: two lines); the checkpoints folder deleted as that line says, the same
  command starts over (exit 0);
- ``write_error``: the k-th checkpoint write fails with "No space left on device" (injected):
  exit 1 and one line; the same command resumes from the previous checkpoint (exit 0);
- ``data_error``: a truncated MNIST file (split_mnist from a copy of --data_dir): exit 1, one
  line;
- ``nan``: a learning rate that makes the first chunk's loss NaN: exit 1, one line.

Every run that ends with exit 0 must give the accuracy matrices of an uninterrupted run of its
method (run once at the start). Any other outcome is a failure: another status, "Fatal Python
error", a core dump (status 134 / SIGABRT, SIGSEGV), more lines, a traceback. The counts
(stops tried, statuses seen, failures) are printed and written to --out as JSON.

The reported crash alone, many times (a SIGKILLed run's checkpoints corrupted, then the same
command again and again, each time after a SIGKILL's stale lock):

    python -m experiments.bench.soak_stops --corrupted_restarts=50 \\
        --config=experiments/configs/split_mnist.py:esacl

counts the restarts that exit 1 with exactly the two documented lines (the stale-lock warning,
then "no usable checkpoint: ... delete ... to start the run over").

`python -m experiments.bench.soak_stops --child=N -- MAIN_ARGS` is the injected-write-error run:
`experiments.main` whose N-th checkpoint write fails with ENOSPC.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import gzip
import json
import os
import pathlib
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILE = "experiments/configs/split_digits.py"
METHODS = ("derpp", "esacl")
SCENARIOS = ("sigint", "sigterm", "sigkill", "corrupt", "write_error", "data_error", "nan")
RESUMABLE = ("--config.num_tasks=2", "--config.epochs=2", "--config.steps_per_call=4",
             "--config.checkpoint=True", "--config.checkpoint_every_steps=8",
             "--config.progress=False", "--config.tensorboard=False")
# EsaCL refreshes its masks every epoch (each refresh a program compiled in the background).
METHOD_ARGS = {"derpp": (), "esacl": ("--config.esacl.mask_update_every_epochs=1",)}
MAX_WARNINGS = 2  # "warning: " lines allowed before the one line (stale lock, damaged checkpoint)
# What an abort looks like; none may ever appear.
ABORT_MARKERS = ("Fatal Python error", "terminate called", "Traceback (most recent call last)",
                 "core dumped", "Segmentation fault")
TIMEOUT_S = 300


@dataclasses.dataclass
class Ended:
    """How one process ended."""
    status: int  # the shell's exit status (128 + N for a process ended by signal N)
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def main_command(workdir: pathlib.Path, method: str, *extra: str,
                 child: int | None = None) -> list[str]:
    """The `experiments.main` command of a stop (or its injected-write-error child)."""
    args = [f"--config={CONFIG_FILE}:{method}", f"--workdir={workdir}", *RESUMABLE,
            *METHOD_ARGS[method], *extra]
    if child is None:
        return [sys.executable, "-m", "experiments.main", *args]
    return [sys.executable, "-m", "experiments.bench.soak_stops", f"--child={child}", "--", *args]


def environment(data_dir: str | None, cache: pathlib.Path | None = None) -> dict[str, str]:
    """A child's environment: CPU, and no persistent compilation cache unless `cache` is given
    (the stopped runs compile everything; restarts may read a warm cache: same results)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ESACL_COMPILATION_CACHE": str(cache or 0)}
    if data_dir:
        env["ESACL_DATA_DIR"] = data_dir
    return env


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> Ended:
    _, err = proc.communicate(timeout=TIMEOUT_S)
    status = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    return Ended(status, err)


def run(command: list[str], env: dict[str, str]) -> Ended:
    return finish(start(command, env))


def checkpoints_written(workdir: pathlib.Path) -> int:
    folder = workdir / "checkpoints"
    numbers = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() \
        else []
    return max(numbers) + 1 if numbers else 0


def wait_for_checkpoints(workdir: pathlib.Path, proc: subprocess.Popen, count: int) -> bool:
    """Waits until `count` checkpoints were written; False if the run ended first."""
    deadline = time.monotonic() + TIMEOUT_S
    while checkpoints_written(workdir) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def matrices(workdir: pathlib.Path) -> tuple[Any, Any]:
    result = json.loads((workdir / "results.json").read_text())
    return result["class_il_matrix"], result["task_il_matrix"]


def problems(ended: Ended, statuses: tuple[int, ...], max_lines: int,
             last_starts: str | None = None) -> list[str]:
    """What is wrong with how a process ended (empty: as documented): its status, an abort,
    more than `max_lines` lines beside at most MAX_WARNINGS "warning: " lines before them, or
    a last line (when it did not exit 0) not starting with `last_starts`."""
    found = []
    if ended.status not in statuses:
        found.append(f"exit status {ended.status}, expected one of {statuses}")
    if any(marker in ended.err for marker in ABORT_MARKERS):
        found.append("abort or traceback on stderr")
    warnings = 0
    while warnings < min(MAX_WARNINGS, len(ended.lines)) and \
            ended.lines[warnings].startswith("warning: "):
        warnings += 1
    if len(ended.lines) - warnings > max_lines:
        found.append(f"{len(ended.lines)} lines on stderr ({warnings} warnings and at most "
                     f"{max_lines} more allowed)")
    if last_starts is not None and ended.status != 0 and not (
            ended.lines and ended.lines[-1].startswith(last_starts)):
        found.append(f"last line does not start with {last_starts!r}")
    return found


def corrupt_checkpoints(workdir: pathlib.Path) -> None:
    for path in (workdir / "checkpoints").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")


def truncated_mnist(data_dir: str, root: pathlib.Path) -> pathlib.Path:
    """A copy of data_dir's MNIST whose training images end early (a data error)."""
    target = root / "truncated_data"
    if not target.is_dir():
        (target / "mnist").mkdir(parents=True)
        for source in (pathlib.Path(data_dir) / "mnist").iterdir():
            shutil.copy(source, target / "mnist" / source.name)
        images = target / "mnist" / "train-images-idx3-ubyte.gz"
        with gzip.open(images) as f:
            head = f.read(1_000_000)
        images.write_bytes(gzip.compress(head))
    return target


def stop_once(scenario: str, method: str, rng: random.Random, root: pathlib.Path,
              reference: dict[str, Any], run_seconds: float, data_dir: str | None
              ) -> dict[str, Any]:
    """One stop: the run, how it ended, the restart (if any) and what was wrong."""
    workdir = root / f"stop_{rng.getrandbits(48):012x}"
    env, warm = environment(data_dir), environment(data_dir, root / "xla")
    record: dict[str, Any] = {"scenario": scenario, "method": method, "problems": []}

    def check(ended: Ended, statuses: tuple[int, ...], max_lines: int, what: str,
              last_starts: str | None = None) -> None:
        record.setdefault("statuses", []).append(ended.status)
        for problem in problems(ended, statuses, max_lines, last_starts):
            record["problems"].append(f"{what}: {problem}: {ended.err.strip()[-600:]!r}")

    def restart_equals_reference() -> None:
        ended = run(main_command(workdir, method), warm)
        check(ended, (0,), 0, "restart")
        if ended.status == 0 and matrices(workdir) != reference[method]:
            record["problems"].append("restart: results differ from an uninterrupted run")

    if scenario in ("sigint", "sigterm", "sigkill"):
        sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[
            scenario]
        delay = rng.uniform(0.0, run_seconds)
        record["delay_s"] = round(delay, 3)
        proc = start(main_command(workdir, method), env)
        time.sleep(delay)
        proc.send_signal(sig)
        ended = finish(proc)
        if scenario == "sigkill":
            check(ended, (0, 137), 0, "stopped run")
        else:
            check(ended, (0, 128 + sig), 1, "stopped run", last_starts="interrupted")
        if ended.status == 0:
            if matrices(workdir) != reference[method]:
                record["problems"].append("results differ from an uninterrupted run")
        else:
            restart_equals_reference()
    elif scenario == "corrupt":
        count = rng.randint(1, 4)
        proc = start(main_command(workdir, method), env)
        written = wait_for_checkpoints(workdir, proc, count)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        finish(proc)
        if not written or (workdir / "results.json").exists():
            record["problems"].append("the run ended before it could be killed")
            return record
        corrupt_checkpoints(workdir)
        ended = run(main_command(workdir, method), env)
        check(ended, (1,), 1, "restart on corrupted checkpoints",
              last_starts="error: no usable checkpoint")
        shutil.rmtree(workdir / "checkpoints")  # what that line says to do
        restart_equals_reference()
    elif scenario == "write_error":
        failing = rng.randint(1, 4)
        record["failing_write"] = failing
        ended = run(main_command(workdir, method, child=failing), env)
        check(ended, (1,), 1, "run with a failing write", last_starts="error: cannot write")
        restart_equals_reference()
    elif scenario == "data_error":
        if not data_dir:
            record["problems"].append("no --data_dir for the data error")
            return record
        truncated = truncated_mnist(data_dir, root)
        ended = run([sys.executable, "-m", "experiments.main",
                     f"--config=experiments/configs/split_mnist.py:{method}",
                     f"--workdir={workdir}", f"--config.data_dir={truncated}",
                     "--config.verify_checksums=False", *RESUMABLE], env)
        check(ended, (1,), 1, "run on truncated data", last_starts="error:")
    elif scenario == "nan":
        ended = run(main_command(workdir, method, "--config.learning_rate=1e30"), env)
        check(ended, (1,), 1, "run with a NaN loss", last_starts="error: loss became NaN")
        if (workdir / "results.json").exists():
            record["problems"].append("a NaN run wrote results.json")
    shutil.rmtree(workdir, ignore_errors=True)
    return record


def references(root: pathlib.Path, data_dir: str | None) -> tuple[dict[str, Any], float]:
    """Each method's uninterrupted matrices, and the longest run's wall time."""
    found, longest = {}, 0.0
    for method in METHODS:
        workdir = root / f"reference_{method}"
        begin = time.monotonic()
        ended = run(main_command(workdir, method), environment(data_dir))
        longest = max(longest, time.monotonic() - begin)
        if ended.status != 0:
            raise SystemExit(f"error: the uninterrupted {method} run failed: {ended.err[-300:]}")
        found[method] = matrices(workdir)
    return found, longest


def soak(stops: int, seed: int, scenarios: tuple[str, ...], data_dir: str | None,
         root: pathlib.Path, log: Any = None, out: pathlib.Path | None = None,
         about: dict[str, str] | None = None) -> dict[str, Any]:
    """`stops` random stops; returns the counts and every failure (and writes them to `out`
    after every stop, so a soak cut short still leaves its counts)."""
    rng = random.Random(seed)
    reference, run_seconds = references(root, data_dir)
    records: list[dict[str, Any]] = []
    begin = time.monotonic()
    for n in range(stops):
        record = stop_once(rng.choice(scenarios), rng.choice(METHODS), rng, root, reference,
                           run_seconds, data_dir)
        records.append(record)
        if log is not None:
            print(f"{n + 1}/{stops} {record['scenario']} {record['method']} "
                  f"statuses {record.get('statuses')} "
                  f"{'; '.join(record['problems']) or 'ok'}", file=log, flush=True)
        if out is not None:
            write_json(out, {**(about or {}), **counts(records, seed, run_seconds, begin)})
    return counts(records, seed, run_seconds, begin)


def redact(value: Any) -> Any:
    """`value` with this machine's temporary paths (the soak's folder) written TMP."""
    return json.loads(re.sub(r"[^\s'\"]*soak_stops_[A-Za-z0-9_]+", "TMP", json.dumps(value)))


def write_json(path: pathlib.Path, value: Any) -> None:
    """Writes `value` (`redact`ed) to `path` whole (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(redact(value), indent=1) + "\n")
    os.replace(tmp, path)


def counts(records: list[dict[str, Any]], seed: int, run_seconds: float, begin: float
           ) -> dict[str, Any]:
    """The soak's counts so far."""
    statuses = collections.Counter(s for r in records for s in r.get("statuses", []))
    return {
        "stops": len(records),
        "seed": seed,
        "per_scenario": dict(collections.Counter(r["scenario"] for r in records)),
        "per_method": dict(collections.Counter(r["method"] for r in records)),
        "processes_started": sum(len(r.get("statuses", [])) for r in records),
        "exit_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "aborts": sum(statuses[s] for s in (134, 139)),
        "failed_stops": [r for r in records if r["problems"]],
        "reference_run_s": round(run_seconds, 2),
        "wall_time_s": round(time.monotonic() - begin, 1),
    }


def stale_lock(workdir: pathlib.Path) -> None:
    """What a SIGKILLed run leaves: a lock naming a process that no longer runs."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (workdir / ".lock").write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "command": "a killed run"}))


def corrupted_restarts(config: str, restarts: int, data_dir: str | None,
                       root: pathlib.Path, log: Any = None) -> dict[str, Any]:
    """The reported case `restarts` times: returns how many restarts ended as documented and
    every status seen."""
    workdir = root / "run"
    command = [sys.executable, "-m", "experiments.main", f"--config={config}",
               f"--workdir={workdir}", "--config.checkpoint=True", "--config.progress=False",
               "--config.tensorboard=False"]
    env = environment(data_dir)
    proc = start(command, env)
    if not wait_for_checkpoints(workdir, proc, 1):
        raise SystemExit(f"error: the run ended before its first checkpoint: "
                         f"{finish(proc).err.strip()[-300:]}")
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    corrupt_checkpoints(workdir)
    statuses: collections.Counter[int] = collections.Counter()
    documented = 0
    for n in range(restarts):
        stale_lock(workdir)
        ended = run(command, env)
        statuses[ended.status] += 1
        ok = (ended.status == 1 and len(ended.lines) == 2
              and ended.lines[0].startswith("warning: taking over the stale lock")
              and ended.lines[1].startswith("error: no usable checkpoint: ")
              and ended.lines[1].endswith("to start the run over"))
        documented += ok
        if log is not None:
            print(f"{n + 1}/{restarts} status {ended.status} "
                  f"{'ok' if ok else repr(ended.err.strip()[-400:])}", file=log, flush=True)
    return {"restarts": restarts, "documented": documented,
            "exit_statuses": {str(k): v for k, v in sorted(statuses.items())}}


def machine() -> str:
    """This machine in words: CPUs, architecture, Python and jax versions."""
    from importlib.metadata import version

    return (f"{os.cpu_count()}-core {platform.machine()} {platform.system()}, Python "
            f"{platform.python_version()}, jax {version('jax')} CPU")


def commit() -> str:
    """The checkout's commit (with "+changes" when the tree differs from it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def render(counts: dict[str, Any]) -> str:
    """The soak's counts as markdown (from the JSON `--out` writes)."""
    lines = ["# Runs stopped at random moments (experiments/bench/soak_stops.py)", "",
             f"- command: `{counts['command']}`", f"- commit: {counts['commit']}",
             f"- machine: {counts['machine']}", "",
             f"{counts['stops']} stops ({counts['processes_started']} processes of "
             "`experiments.main`: the stopped runs and their restarts) in "
             f"{counts['wall_time_s'] / 60:.0f} min; an uninterrupted run took "
             f"{counts['reference_run_s']} s. **{len(counts['failed_stops'])} stops failed, "
             f"{counts['aborts']} processes aborted** (status 134 or 139). The counts are "
             "rewritten after every stop: a soak stopped before --stops reports the stops it "
             "made.", "",
             "| way of stopping | stops |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in sorted(counts["per_scenario"].items())]
    lines += ["", "| exit status | processes |", "|---|---|"]
    lines += [f"| {status} | {n} |" for status, n in counts["exit_statuses"].items()]
    lines += ["", "Per method: " + ", ".join(f"{m} {n}" for m, n in
                                            sorted(counts["per_method"].items())) + "."]
    for record in counts["failed_stops"]:
        lines.append(f"- failed: {record['scenario']} {record['method']}: "
                     f"{'; '.join(record['problems'])[:500]}")
    return "\n".join(lines) + "\n"


def child(failing: int, main_args: list[str]) -> None:
    """`experiments.main` with its `failing`-th checkpoint write failing (ENOSPC)."""
    import orbax.checkpoint as ocp
    from absl import app

    from experiments import early_signals
    from experiments import main as entry

    entry._EARLY = early_signals.EarlySignals().install()
    calls = {"n": 0}
    save = ocp.CheckpointManager.save

    def failing_save(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(self, *args, **kwargs)

    ocp.CheckpointManager.save = failing_save
    sys.argv = ["experiments.main", *main_args]
    app.run(entry.main, flags_parser=entry.parse_flags)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stops", type=int, default=200, help="how many stops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--data_dir", default=os.environ.get("ESACL_DATA_DIR", ""),
                        help="MNIST copy for the data error (default $ESACL_DATA_DIR)")
    parser.add_argument("--out", default="", help="write the counts here as JSON (and the "
                        "table beside it, .md)")
    parser.add_argument("--render", default="", help="only rebuild the .md beside this JSON")
    parser.add_argument("--corrupted_restarts", type=int, default=0,
                        help="only the reported case, this many restarts (see module)")
    parser.add_argument("--config", default="experiments/configs/split_mnist.py:esacl",
                        help="--corrupted_restarts: the run's config")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("main_args", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child is not None:
        child(args.child, args.main_args)
        return 0
    if args.corrupted_restarts > 0:
        with tempfile.TemporaryDirectory(prefix="soak_stops_") as tmp:
            found = corrupted_restarts(args.config, args.corrupted_restarts,
                                       args.data_dir or None, pathlib.Path(tmp), sys.stdout)
        found = {"command": "python -m experiments.bench.soak_stops " + " ".join(argv),
                 "commit": commit(), "machine": machine(), **found}
        print(json.dumps(found, indent=1))
        if args.out:
            write_json(pathlib.Path(args.out), found)
        return 0 if found["documented"] == found["restarts"] else 1
    if args.render:
        source = pathlib.Path(args.render)
        source.with_suffix(".md").write_text(render(redact(json.loads(source.read_text()))))
        return 0
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown or not scenarios:
        print(f"error: unknown scenario(s) {unknown}; choose from {','.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    if args.stops < 1:
        print(f"error: --stops must be >= 1, got {args.stops}", file=sys.stderr)
        return 2
    about = {"command": "python -m experiments.bench.soak_stops " + " ".join(argv),
             "commit": commit(), "machine": machine()}
    out = pathlib.Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory(prefix="soak_stops_") as tmp:
        found = {**about, **soak(args.stops, args.seed, scenarios, args.data_dir or None,
                                 pathlib.Path(tmp), log=sys.stdout, out=out, about=about)}
    if out is not None:
        out.with_suffix(".md").write_text(render(redact(found)))
    print(json.dumps({k: v for k, v in found.items() if k != "failed_stops"}, indent=1))
    for record in found["failed_stops"]:
        print(f"FAILED {record}", file=sys.stderr)
    return 1 if found["failed_stops"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
