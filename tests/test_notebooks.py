"""The notebooks run top to bottom on tiny real runs (nbclient), and are stored without outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hydra_utils import TINY_RUN as TINY

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert {p.stem for p in NOTEBOOKS} >= {"error_amplification", "results_tables", "pairing_ablation"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path: Path) -> None:
    # Outputs would put one machine's numbers (and images) into git; the notebooks read run directories instead.
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"{path.name}: strip outputs"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two error-silenced BWN runs (pairing the logits vs the digits blocks), through the real entry point."""
    root = tmp_path_factory.mktemp("notebook_runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "esq_lightning.cli.train",
        "-m",
        "pairing=logits,digits_blocks",
        *TINY,
        f"paths.runs_root={root}",
        f"hydra.sweep.dir={root}/multirun",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(root.rglob("results.json"))) == 2
    return root


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_tiny_runs(
    path: Path, tiny_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: where the runs are, few inputs, one thread.
    monkeypatch.setenv("ESQ_RUNS_DIR", str(tiny_runs))
    monkeypatch.setenv("ESQ_AMP_N_SAMPLES", "32")
    monkeypatch.setenv("ESQ_REPORT_OUT", str(tmp_path / "report"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(
        o.get("text", "") + json.dumps(o.get("data", {}).get("text/markdown", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    if path.stem == "error_amplification":
        assert "measured 2 curves on 32 test inputs each" in text
    elif path.stem == "results_tables":
        assert "2 results.json files" in text and (tmp_path / "report" / "report.md").is_file()
    elif path.stem == "pairing_ablation":
        assert "2 error-silenced runs in 2 configurations" in text and "block1, block2, block3, logits" in text
