"""A workdir holding a finished run of another config is never overwritten (`make run` twice).

`esacl_jax.harness.workdirs.resolve_workdir` decides where `experiments.main` writes;
`latest_finished_run` is what `experiments.side_by_side --latest` (the Makefile's) compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from esacl_jax.harness.sweep.plan import plain_config
from esacl_jax.harness.workdirs import latest_finished_run, resolve_workdir
from experiments.configs import split_digits
from tests.conftest import REPO_ROOT


def finished(workdir, config, **extra) -> None:
    """A stand-in for a finished run of `config` in `workdir` (only what is compared)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps({"config": plain_config(config), **extra}))


def derpp(**overrides):
    config = split_digits.get_config("derpp")
    for key, value in overrides.items():
        config[key] = value
    return config


def test_a_new_or_unfinished_workdir_is_used_as_it_is(tmp_path):
    assert resolve_workdir(derpp(), tmp_path / "new").path == tmp_path / "new"
    interrupted = tmp_path / "interrupted"  # checkpoints, no results.json: resumes there
    (interrupted / "checkpoints" / "3").mkdir(parents=True)
    resolved = resolve_workdir(derpp(), interrupted)
    assert resolved.path == interrupted and resolved.note is None


def test_the_same_config_runs_again_in_place(tmp_path):
    finished(tmp_path / "run", derpp())
    resolved = resolve_workdir(derpp(), tmp_path / "run")
    assert resolved.path == tmp_path / "run"
    assert resolved.note == (f"{tmp_path / 'run'} holds a finished run with the same config: "
                             "this run replaces its results")


def test_fields_that_do_not_change_the_computation_are_not_compared(tmp_path):
    finished(tmp_path / "run", derpp(progress=False, data_dir="/somewhere", checkpoint=True))
    assert resolve_workdir(derpp(), tmp_path / "run").path == tmp_path / "run"
    # A section the method does not read (DER++ and EsaCL's knobs) is not compared either.
    other = derpp()
    other.esacl.rho = 0.5
    finished(tmp_path / "sections", other)
    assert resolve_workdir(derpp(), tmp_path / "sections").path == tmp_path / "sections"


def test_another_config_goes_to_the_first_free_sibling_and_says_so(tmp_path):
    run = tmp_path / "split_digits_derpp"
    finished(run, derpp())
    resolved = resolve_workdir(derpp(learning_rate=0.05, seed=3), run)
    assert resolved.path == tmp_path / "split_digits_derpp-2"
    assert resolved.note == (f"{run} already holds a finished run with another config (differs "
                             f"in: learning_rate, seed); this run writes to {run}-2")
    assert "\n" not in resolved.note
    # -2 taken by yet another config: -3. -2 holding this config: -2 again (no new folder).
    finished(tmp_path / "split_digits_derpp-2", derpp(learning_rate=0.1))
    assert resolve_workdir(derpp(learning_rate=0.05), run).path == run.with_name(run.name + "-3")
    finished(tmp_path / "split_digits_derpp-3", derpp(learning_rate=0.05))
    resolved = resolve_workdir(derpp(learning_rate=0.05), run)
    assert resolved.path == run.with_name(run.name + "-3")
    assert resolved.note.endswith("(replacing its finished run of the same config)")
    # And the original config still finds its own folder.
    assert resolve_workdir(derpp(), run).path == run


def test_many_differences_are_listed_briefly(tmp_path):
    finished(tmp_path / "run", derpp())
    note = resolve_workdir(derpp(learning_rate=0.05, seed=3, batch_size=20, epochs=2,
                                 buffer_size=100), tmp_path / "run").note
    assert "(differs in: batch_size, buffer_size, epochs, learning_rate, +1 more)" in note


def test_an_unreadable_results_json_is_kept_too(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{not json")
    resolved = resolve_workdir(derpp(), tmp_path / "run")
    assert resolved.path == tmp_path / "run-2"
    assert "cannot be compared" in resolved.note and resolved.note.endswith(f"{tmp_path}/run-2")


def test_latest_finished_run_is_the_newest_sibling(tmp_path):
    base = tmp_path / "x"
    assert latest_finished_run(base) == base  # nothing yet: the name given
    for name, when in [("x", 100), ("x-2", 300), ("x-10", 200), ("x-0", 900), ("xy", 900),
                       ("x-2b", 900)]:
        finished(tmp_path / name, derpp())
        os.utime(tmp_path / name / "results.json", ns=(when * 10**9, when * 10**9))
    assert latest_finished_run(base) == tmp_path / "x-2"
    os.utime(base / "results.json", ns=(400 * 10**9, 400 * 10**9))
    assert latest_finished_run(base) == base
    (tmp_path / "x-11").mkdir()  # no results.json: not a finished run
    assert latest_finished_run(base) == base


def _fake_result(method: str, lr: float) -> dict:
    metrics = {"average_accuracy": 0.5, "forgetting": 0.1}
    return {"method": method, "seed": 0, "benchmark": {"name": "split_digits"},
            "metrics": {"class_il": metrics, "task_il": metrics}, "training_flops": 1e6 * lr,
            "weights": {"sparsity": 0.0, "nonzero": 10}}


def test_side_by_side_latest_shows_the_directories_the_runs_wrote(tmp_path):
    finished(tmp_path / "a", derpp(), **_fake_result("first", 1.0))
    finished(tmp_path / "a-2", derpp(learning_rate=0.5), **_fake_result("second", 2.0))
    finished(tmp_path / "b", derpp(), **_fake_result("base", 1.0))
    os.utime(tmp_path / "a" / "results.json", ns=(10**9, 10**9))

    def side_by_side(*args):
        proc = subprocess.run([sys.executable, "-m", "experiments.side_by_side", *args],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    latest = side_by_side("--latest", str(tmp_path / "a"), str(tmp_path / "b"))
    assert "second" in latest and "first" not in latest and "2.00x" in latest
    given = side_by_side(str(tmp_path / "a"), str(tmp_path / "b"))
    assert "first" in given and "second" not in given


def run_main(workdir, *args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.main",
         "--config=experiments/configs/split_digits.py:finetune", f"--workdir={workdir}",
         "--config.epochs=1", "--config.max_train_per_task=40", "--config.num_tasks=2",
         "--config.progress=False", "--config.tensorboard=False", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "ESACL_COMPILATION_CACHE": "0"})


def test_main_keeps_a_finished_run_of_another_config(tmp_path):
    run = tmp_path / "runs" / "split_digits_finetune"
    first = run_main(run)
    assert first.returncode == 0, first.stderr
    assert f"results: {run}/results.json" in first.stdout
    before = (run / "results.json").read_bytes()

    second = run_main(run, "--config.learning_rate=0.05")
    assert second.returncode == 0, second.stderr
    note = (f"{run} already holds a finished run with another config (differs in: "
            f"learning_rate); this run writes to {run}-2")
    assert note in second.stderr.splitlines()
    assert f"results: {run}-2/results.json" in second.stdout
    assert (run / "results.json").read_bytes() == before  # the earlier run is untouched
    stored = json.loads((tmp_path / "runs" / "split_digits_finetune-2" / "results.json")
                        .read_text())
    assert stored["config"]["learning_rate"] == 0.05
    assert latest_finished_run(run) == run.with_name(run.name + "-2")
