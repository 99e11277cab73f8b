"""Start-up: a run imports only what it uses, and compiles each of its programs once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

OPTIONAL = ("tensorboardX", "orbax.checkpoint", "tensorflow_datasets", "tensorflow",
            "matplotlib", "sklearn", "scipy", "ray")

# Runs experiments.main in this process, then reports the optional modules it loaded and how
# often each program was compiled (jax.monitoring's compile-time events, by program name).
_PROBE = """
import atexit, collections, json, runpy, sys
from jax import monitoring
compiles = collections.Counter()
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.update([kw.get("fun_name")])
    if event == "/jax/core/compile/backend_compile_duration" else None)
atexit.register(lambda: print("PROBE " + json.dumps({
    "loaded": [m for m in OPTIONAL if m in sys.modules], "compiles": compiles})))
sys.argv = ["experiments.main"] + ARGS
runpy.run_module("experiments.main", run_name="__main__")
"""


def _probe(tmp_path, data_dir, *flags: str) -> dict:
    args = ["--config=experiments/configs/split_mnist.py:esacl", f"--workdir={tmp_path}/run",
            f"--config.data_dir={data_dir}", "--config.progress=False", "--config.num_tasks=2",
            "--config.max_train_per_task=300", "--config.max_test_per_task=100", *flags]
    code = f"OPTIONAL = {OPTIONAL!r}\nARGS = {args!r}\n" + _PROBE
    env = dict(os.environ, ESACL_COMPILATION_CACHE="0")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


def test_a_run_imports_only_what_it_uses_and_compiles_each_program_once(tmp_path,
                                                                         shared_data_dir):
    plain = _probe(tmp_path / "plain", shared_data_dir, "--config.tensorboard=False")
    assert plain["loaded"] == [], plain["loaded"]
    # Each program once: the chunk and the prediction were compiled in the background from
    # their argument shapes, and the loop's first calls reused them.
    for name in ("jit(init)", "jit(run_chunk)", "jit(predict)", "jit(_padded_permutation_fn)",
                 "jit(refresh_masks)"):
        assert plain["compiles"].get(name) == 1, (name, plain["compiles"])
    # Asked for, TensorBoard logging and checkpoints load their libraries (and only those).
    logged = _probe(tmp_path / "logged", shared_data_dir, "--config.tensorboard=True",
                    "--config.checkpoint=True")
    assert sorted(logged["loaded"]) == ["orbax.checkpoint", "tensorboardX"], logged["loaded"]
