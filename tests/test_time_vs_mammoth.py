"""experiments/bench/time_vs_mammoth.sh with stand-in programs for both sides (no torch, no
training): the CSV it appends, accuracy parsing, failures recorded and reported by the exit
status."""

from __future__ import annotations

import csv
import os
import pathlib
import shutil
import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "experiments" / "bench" / "time_vs_mammoth.sh"

FAKE_OURS = f"""#!/usr/bin/env bash
# Stand-in for the repo's python: `-c` goes to a real interpreter, `-m experiments.main` writes
# a results.json into --workdir.
if [[ "$1" == -c ]]; then exec {sys.executable} "$@"; fi
for a in "$@"; do case "$a" in --workdir=*) w="${{a#--workdir=}}";; esac; done
mkdir -p "$w"
acc='"class_il": {{"average_accuracy": 0.9127}}, "task_il": {{"average_accuracy": 0.9912}}'
printf '{{"metrics": {{%s}}}}' "$acc" > "$w/results.json"
"""

FAKE_MAMMOTH = """import sys
seed = sys.argv[sys.argv.index("--seed") + 1]
print("args:", " ".join(sys.argv[1:]), "sitecustomize:", "sitecustomize" in sys.modules)
print("[ 99 %] Task 5 | epoch 0: |###|\\r", file=sys.stderr, end="")
print("\\nAccuracy for 5 task(s): \\t [Class-IL]: 87.34 % \\t [Task-IL]: 98.73 %", file=sys.stderr)
sys.exit(3 if seed == "1" else 0)
"""


def _run(tmp_path: pathlib.Path, *args: str, layout: str = "2020",
         **env: str) -> subprocess.CompletedProcess:
    ours = tmp_path / "ours_python"
    ours.write_text(FAKE_OURS)
    ours.chmod(0o755)
    mammoth = tmp_path / "mammoth"
    main = mammoth / ("utils/main.py" if layout == "2020" else "main.py")
    main.parent.mkdir(parents=True, exist_ok=True)
    main.write_text(FAKE_MAMMOTH)
    full_env = dict(os.environ, OURS_PY=str(ours), MAMMOTH_DIR=str(mammoth),
                    MAMMOTH_PY=sys.executable, OUT_CSV=str(tmp_path / "t.csv"), **env)
    return subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_pairs_are_recorded_with_accuracies(tmp_path):
    proc = _run(tmp_path, "1", WITH_CACHE="1")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["impl"] for r in rows] == ["ours_derpp_cold", "mammoth", "ours_derpp_warm",
                                         "ours_esacl_cold", "ours_esacl_warm"]
    assert [(r["class_il"], r["task_il"]) for r in rows] == [
        ("91.27", "99.12"), ("87.34", "98.73")] + [("91.27", "99.12")] * 3
    assert all(float(r["wall_s"]) >= 0 and r["rc"] == "0" for r in rows)
    # mammoth's DataLoader without worker processes by default (its fastest on 2 cores)
    assert {r["setting"] for r in rows} == {"mammoth_threads=1;workers=0;pin=none"}


def test_current_mammoth_gets_the_der_settings_and_the_thread_cap(tmp_path):
    """The current release's layout (main.py at the top, no seq-mnist best args): the DER
    paper's DER++ settings are passed explicitly, and torch's threads are capped through a
    sitecustomize on the path (a no-op here, where no torch is imported)."""
    proc = _run(tmp_path, "1", layout="current", WITH_CACHE="0", WITH_ESACL="0",
                KEEP_LOGS="1")
    assert proc.returncode == 0, proc.stderr
    kept = pathlib.Path(proc.stderr.split("logs kept in ")[1].split()[0])
    stdout = next(kept.glob("mammoth.s0.*/stdout")).read_text()
    shutil.rmtree(kept)
    for arg in ("--model derpp", "--dataset seq-mnist", "--buffer_size 500", "--lr 0.03",
                "--alpha 1.0", "--beta 0.5", "--batch_size 10", "--minibatch_size 10",
                "--n_epochs 1", "--num_workers 0", "--seed 0"):
        assert arg in stdout, (arg, stdout)
    assert "--load_best_args" not in stdout and "sitecustomize: True" in stdout
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["impl"] for r in rows] == ["ours_derpp_cold", "mammoth"]


def test_mammoth_workers_is_an_option(tmp_path):
    """MAMMOTH_WORKERS=2 passes --num_workers 2; empty passes none (mammoth's default)."""
    for workers, arg, setting in (("2", "--num_workers 2", "workers=2"),
                                  ("", None, "workers=default")):
        (tmp_path / (workers or "empty")).mkdir()
        proc = _run(tmp_path / (workers or "empty"), "1", layout="current", WITH_CACHE="0",
                    WITH_ESACL="0", MAMMOTH_WORKERS=workers, KEEP_LOGS="1")
        assert proc.returncode == 0, proc.stderr
        kept = pathlib.Path(proc.stderr.split("logs kept in ")[1].split()[0])
        stdout = next(kept.glob("mammoth.s0.*/stdout")).read_text()
        shutil.rmtree(kept)
        assert (arg in stdout) if arg else ("--num_workers" not in stdout), stdout
        rows = list(csv.DictReader(open(tmp_path / (workers or "empty") / "t.csv")))
        assert setting in rows[-1]["setting"]


def test_a_failed_run_is_recorded_and_fails_the_script(tmp_path):
    proc = _run(tmp_path, "1", SEED0="1", WITH_CACHE="0", WITH_ESACL="0")
    assert proc.returncode == 1
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [(r["impl"], r["rc"]) for r in rows] == [("ours_derpp_cold", "0"), ("mammoth", "3")]


def test_bad_settings_are_one_line_errors(tmp_path):
    for env in ({"PIN_CPU": "first"}, {"MAMMOTH_THREADS": "two"}, {"MAMMOTH_WORKERS": "-1"}):
        proc = _run(tmp_path, "1", **env)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_missing_mammoth_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MAMMOTH_DIR", "MAMMOTH_PY")}
    proc = subprocess.run(["bash", str(SCRIPT), "1"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "MAMMOTH_DIR" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
