"""experiments/time_vs_mammoth.sh with stand-in programs for both sides (no torch, no training):
the CSV it appends, accuracy parsing, failures recorded and reported by the exit status."""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "experiments" / "time_vs_mammoth.sh"

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
print("[ 99 %] Task 5 | epoch 0: |###|\\r", file=sys.stderr, end="")
print("\\nAccuracy for 5 task(s): \\t [Class-IL]: 87.34 % \\t [Task-IL]: 98.73 %", file=sys.stderr)
sys.exit(3 if seed == "1" else 0)
"""


def _run(tmp_path: pathlib.Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    ours = tmp_path / "ours_python"
    ours.write_text(FAKE_OURS)
    ours.chmod(0o755)
    mammoth = tmp_path / "mammoth"
    (mammoth / "utils").mkdir(parents=True, exist_ok=True)
    (mammoth / "utils" / "main.py").write_text(FAKE_MAMMOTH)
    full_env = dict(os.environ, OURS_PY=str(ours), MAMMOTH_DIR=str(mammoth),
                    MAMMOTH_PY=sys.executable, OUT_CSV=str(tmp_path / "t.csv"), **env)
    return subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_pairs_are_recorded_with_accuracies(tmp_path):
    proc = _run(tmp_path, "1", WITH_CACHE="1")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["impl"] for r in rows] == ["ours", "mammoth", "ours_cache"]
    assert [(r["class_il"], r["task_il"]) for r in rows] == [
        ("91.27", "99.12"), ("87.34", "98.73"), ("91.27", "99.12")]
    assert all(float(r["wall_s"]) >= 0 and r["rc"] == "0" for r in rows)


def test_a_failed_run_is_recorded_and_fails_the_script(tmp_path):
    proc = _run(tmp_path, "1", SEED0="1", WITH_CACHE="0")
    assert proc.returncode == 1
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [(r["impl"], r["rc"]) for r in rows] == [("ours", "0"), ("mammoth", "3")]


def test_missing_mammoth_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MAMMOTH_DIR", "MAMMOTH_PY")}
    proc = subprocess.run(["bash", str(SCRIPT), "1"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "MAMMOTH_DIR" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
