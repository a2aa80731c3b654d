"""The import layering of docs/architecture.md holds, and its contracts (pyproject.toml [tool.importlinter]) catch
an import that breaks it. `make test` runs lint-imports before pytest; these tests run it too, and on a copy of
the package with one wrong import added (the tree itself is never modified)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(config: Path, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    command = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath else dict(os.environ)
    return subprocess.run(
        [*command, "--config", str(config), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_package_keeps_its_import_contracts() -> None:
    proc = lint_imports(ROOT / "pyproject.toml", ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # evaluation never imports training (and the layers contract: evaluation sits below training)
        (
            "evaluation/whitebox.py",
            "from esq_lightning.training.objectives import Objective",
            "esq_lightning.evaluation is not allowed to import esq_lightning.training",
        ),
        # config is checked before torch loads
        ("config/labels.py", "import torch", "esq_lightning.config is not allowed to import torch"),
        # artifacts sits below the libraries
        (
            "artifacts/runs.py",
            "from esq_lightning.reporting import report",
            "esq_lightning.artifacts is not allowed to import esq_lightning.reporting",
        ),
    ],
)
def test_a_wrong_import_is_caught(tmp_path: Path, module: str, line: str, broken: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "esq_lightning", src / "esq_lightning", ignore=shutil.ignore_patterns("__pycache__", "conf"))
    target = src / "esq_lightning" / module
    target.write_text(target.read_text() + f"\n{line}  # a deliberately wrong import\n")
    config = tmp_path / "pyproject.toml"
    shutil.copy(ROOT / "pyproject.toml", config)
    proc = lint_imports(config, tmp_path, pythonpath=src)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert broken in " ".join(proc.stdout.split()), proc.stdout[-3000:]
    # the copy was analysed, not the installed package
    assert "deliberately wrong" not in (ROOT / "esq_lightning" / module).read_text()
