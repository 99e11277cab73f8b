"""notebooks/colab_tpu.ipynb runs top to bottom on CPU with a small config, so it cannot rot.

The notebook is executed with nbclient in a kernel of this interpreter (the venv running pytest),
papermill-style: a cell that overrides the defaults is inserted after the cell tagged
"parameters" (no install, split_mnist on 200 examples a task for 1 epoch, no CIFAR). Checked: no
cell fails, the summary is printed, and the accuracy-matrix and accuracy-vs-FLOPs figures are
shown as PNG outputs.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO_ROOT, xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO_ROOT / "notebooks" / "colab_tpu.ipynb"
KERNEL = "esacl-test-python"


def _kernel_dir(root):
    """A kernelspec running this interpreter, so the kernel sees the same packages as pytest.

    It lives in a directory put first on JUPYTER_PATH: nothing is installed for the user, and a
    user's own "python3" kernelspec (another environment) cannot be picked up by mistake.
    """
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "esacl_jax tests", "language": "python"}))
    return root


def _inject(nb, parameters: dict) -> None:
    index = next(i for i, cell in enumerate(nb.cells)
                 if "parameters" in cell.get("metadata", {}).get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
        source, metadata={"tags": ["injected-parameters"]}))


def _outputs(cell, kind):
    return [o for o in cell.get("outputs", []) if o.get("output_type") == kind]


def test_notebook_is_valid_and_parametrized():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("accelerator") == "TPU"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    for name in ("REPO_URL", "INSTALL", "SMALL", "DATA_DIR", "WORKDIR", "MAX_TRAIN", "EPOCHS",
                 "CIFAR"):
        assert f"{name} = " in tagged[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch, shared_data_dir):
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_dir(tmp_path / "jupyter")))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", xla_flags())  # the notebook makes no extra CPU devices
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "runs"
    _inject(nb, dict(INSTALL=False, SMALL=True, DATA_DIR=str(shared_data_dir),
                     WORKDIR=str(workdir), MAX_TRAIN=200, EPOCHS=1, CIFAR=False))
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the traceback) if a cell fails

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in _outputs(c, "stream") if o.get("name") == "stdout")
    assert "split_mnist, esacl, seed 0" in text
    assert "class-IL" in text and "training FLOPs" in text  # format_summary's lines
    assert "split_cifar10 skipped" in text
    assert (workdir / "split_mnist_esacl" / "results.json").is_file()
    result = json.loads((workdir / "split_mnist_esacl" / "results.json").read_text())
    assert result["config"]["max_train_per_task"] == 200
    assert result["config"]["epochs"] == 1

    pngs = [o for c in nb.cells if c.cell_type == "code"
            for o in _outputs(c, "display_data") if "image/png" in o.get("data", {})]
    assert len(pngs) == 2  # split_mnist's accuracy matrix, accuracy vs FLOPs
    assert (workdir / "figures" / "accuracy_vs_flops.png").is_file()
    assert (workdir / "figures" / "split_mnist_esacl_accuracy_matrix.png").is_file()
