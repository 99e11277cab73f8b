"""Data parallelism on 8 CPU devices (XLA_FLAGS in a subprocess): same results as 1 device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT, xla_flags

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from experiments.configs import split_digits
    from esacl_jax.harness.loop import train_and_evaluate

    out = {"device_count": jax.device_count()}
    for method in ("derpp", "esacl"):
        config = split_digits.get_config(method)
        config.progress = config.tensorboard = False
        config.batch_size, config.epochs, config.num_tasks = 16, 2, 3
        runs = {}
        for devices in (8, 1):
            config.num_devices = devices
            result = train_and_evaluate(config, f"{sys.argv[1]}/{method}{devices}")
            runs[devices] = result
        out[method] = {str(d): {"num_devices": r["num_devices"],
                                "class_il": r["class_il_matrix"].tolist(),
                                "task_il": r["task_il_matrix"].tolist()}
                       for d, r in runs.items()}
    print("RESULT" + json.dumps(out))
""")


def test_eight_device_data_parallel_matches_one_device(tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    assert out["device_count"] == 8
    for method in ("derpp", "esacl"):
        eight, one = out[method]["8"], out[method]["1"]
        assert eight["num_devices"] == 8 and one["num_devices"] == 1
        for setting in ("class_il", "task_il"):
            a, b = eight[setting], one[setting]
            # Same data order, same keys: only the all-reduce's summation order differs.
            diffs = [abs(x - y) for ra, rb in zip(a, b, strict=True)
                     for x, y in zip(ra, rb, strict=True)]
            assert max(diffs) <= 0.02, (method, setting, a, b)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
    script = textwrap.dedent("""
        import sys
        from experiments.configs import split_digits
        from esacl_jax.harness.loop import train_and_evaluate
        config = split_digits.get_config("finetune")
        config.progress = config.tensorboard = False
        config.batch_size = 10
        try:
            train_and_evaluate(config, sys.argv[1])
        except ValueError as err:
            print("ERR", err)
    """)
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    expected = "ERR batch_size 10 must be divisible by the 8 devices"
    assert expected in proc.stdout, proc.stderr[-2000:]
    assert not (tmp_path / "results.json").exists()
