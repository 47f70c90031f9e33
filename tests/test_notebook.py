"""Execute notebooks/neuron_select_walkthrough.ipynb with nbclient (tiny model, offline); any cell error fails."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "neuron_select_walkthrough.ipynb"


def _ensure_kernel(tmp_path: Path, monkeypatch) -> None:
    """Make 'python3' run this interpreter: keep a spec whose argv is 'python' (jupyter_client swaps in
    sys.executable) or this executable; otherwise put a private spec first on JUPYTER_PATH."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
        if (
            argv0 in ("python", f"python{sys.version_info[0]}")
            or Path(argv0).resolve() == Path(sys.executable).resolve()
        ):
            return
    except NoSuchKernel:
        pass
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))


def test_walkthrough_runs_end_to_end(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    sources = "\n".join(c.source for c in nb.cells)
    for step in ("select_neurons", "plot_layers", "neuron_groups", "train_loop", "score_translations",
                 "save_pretrained", "merge_and_unload"):  # fmt: skip
        assert step in sources, f"the walkthrough lost its {step} step"
    _ensure_kernel(tmp_path, monkeypatch)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()  # raises CellExecutionError at the first failing cell
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "all checks passed" in outputs
    assert "reloads with the same logits" in outputs
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # layer heatmap and neuron-variance curves
