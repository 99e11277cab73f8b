"""Multi-host data parallelism (JAX's multi-controller runtime, gloo CPU collectives): two
processes on localhost with 2 CPU devices each give the accuracy matrices of one process with 4.

Each run is a subprocess (XLA_FLAGS must be set before JAX starts); the two processes of the
distributed run meet at a coordinator on a free localhost port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, xla_flags

pytestmark = pytest.mark.slow

# argv: workdir, method, process_id (-1: single process), coordinator port
SCRIPT = textwrap.dedent("""
    import json, sys
    workdir, method, process_id, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    from experiments.configs import split_digits
    from esacl_jax.harness.loop import train_and_evaluate

    config = split_digits.get_config(method)
    config.progress = config.tensorboard = False
    config.num_tasks, config.epochs, config.steps_per_call = 2, 1, 20
    config.batch_size = config.replay_batch_size = 8
    config.buffer_size = 100
    # The distributed run checkpoints (orbax's multi-process save, all processes together);
    # the one-process reference does not (checkpointing does not change the result).
    config.checkpoint = process_id >= 0
    if process_id >= 0:
        config.distributed = True
        config.coordinator_address = f"localhost:{port}"
        config.num_processes, config.process_id = 2, process_id
    result = train_and_evaluate(config, workdir, progress=False)
    if config.checkpoint:  # the same run again resumes from its last checkpoint (restored by
        again = train_and_evaluate(config, workdir, progress=False)  # every process, checksums
        assert again["class_il_matrix"].tolist() == result["class_il_matrix"].tolist()  # checked
    import jax
    out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "device_count": jax.device_count(), "num_devices": result["num_devices"],
           "class_il": result["class_il_matrix"].tolist(),
           "task_il": result["task_il_matrix"].tolist()}
    print("RESULT" + json.dumps(out), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices}")}


def _result(stdout: str) -> dict:
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def _gloo_available() -> bool:
    """Whether the installed jaxlib has gloo CPU cross-process collectives."""
    try:
        from jax._src.lib import _jax
    except ImportError:
        return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


@pytest.mark.skipif(not _gloo_available(),
                    reason="the installed jaxlib has no CPU cross-process collectives (gloo)")
def test_two_processes_match_one_process_with_four_devices(tmp_path):
    # DER++: the replay buffer (reservoir) and its stored logits live in the replicated state;
    # checkpointing on, so orbax's multi-process save and restore run too. (EsaCL, with masks
    # and per-example score statistics, gives identical matrices the same way: too slow here.)
    method = "derpp"
    port = str(_free_port())
    shared = tmp_path / "two"  # one workdir for both processes, as on a shared filesystem
    logs = [(tmp_path / f"process{i}.out", tmp_path / f"process{i}.err") for i in range(2)]
    procs = []
    for i, (out_path, err_path) in enumerate(logs):  # files, not pipes: nothing blocks on output
        with open(out_path, "w") as out, open(err_path, "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", SCRIPT, str(shared), method, str(i), port],
                cwd=REPO_ROOT, env=_env(2), stdout=out, stderr=err, text=True))
    single = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "one"), method, "-1",
                             "0"], cwd=REPO_ROOT, env=_env(4), capture_output=True, text=True,
                            timeout=600)
    outputs = []
    try:
        for proc, (out_path, err_path) in zip(procs, logs, strict=True):
            proc.wait(timeout=600)
            assert proc.returncode == 0, err_path.read_text()[-3000:]
            outputs.append(_result(out_path.read_text()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert single.returncode == 0, single.stderr[-3000:]
    one = _result(single.stdout)
    assert one["process_count"] == 1 and one["device_count"] == 4 and one["num_devices"] == 4
    for i, out in enumerate(outputs):
        assert out["process_index"] == i and out["process_count"] == 2
        assert out["device_count"] == 4 and out["num_devices"] == 4
        for setting in ("class_il", "task_il"):
            # Same global batches and keys: only the all-reduce's summation order may differ.
            np.testing.assert_allclose(np.asarray(out[setting], float),
                                       np.asarray(one[setting], float), atol=1e-6,
                                       err_msg=f"{method} {setting} process {i}")
    # Only process 0 wrote results.json (and held the lock, now released).
    written = json.loads((shared / "results.json").read_text())
    assert written["num_processes"] == 2 and written["num_devices"] == 4
    np.testing.assert_allclose(np.asarray(written["class_il_matrix"], float),
                               np.asarray(one["class_il"], float), atol=1e-6)
    assert not (shared / ".lock").exists()
    # Saved after each task by both processes together (the last two kept), then restored.
    assert sorted(p.name for p in (shared / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["0", "1"]
