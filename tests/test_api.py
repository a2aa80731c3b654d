"""The Python API: the README's example runs as written, keyword arguments are the CLI's overrides, and importing
the package (and a config error) stays free of torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from esq_lightning.api import to_overrides
from esq_lightning.errors import ESQUserError

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- api-example: tests/test_api.py runs this block as it is -->"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    assert MARKER in text, "README.md lost the API example's marker"
    match = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.S)
    assert match, "no ```python block after the API example's marker"
    return match.group(1)


def run_python(code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def test_readme_api_example_is_valid_python_using_the_api() -> None:
    code = readme_example()
    compile(code, "README.md", "exec")
    assert re.search(r"^from esq_lightning import train, evaluate, export, load_model, load_results$", code, re.M)
    for call in ("train(", "evaluate(", "export(", "load_model(", "load_results("):
        assert call in code


@pytest.mark.slow  # about 25 s on a quiet 2-core machine (one epoch, two evaluations, an export)
def test_readme_api_example_runs_as_written(tmp_path: Path) -> None:
    code = readme_example()
    assert "from esq_lightning import train, evaluate, export, load_model, load_results" in code
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"clean \d\.\d{3}, PGD-20 \d\.\d{3}, file \d+\.\dx smaller than float32, \d+ results\.json", last
    ), last
    (results,) = (tmp_path / "outputs" / "runs").rglob("results.json")
    record = json.loads(results.read_text())
    assert record["task"] == "train" and Path(record["checkpoint"]).with_suffix(".esq").is_file()
    # Hydra's files are written next to the run, as esq-train does (esq-report reads the overrides).
    assert (results.parent / ".hydra" / "config.yaml").is_file() and (
        results.parent / ".hydra" / "overrides.yaml"
    ).is_file()


def test_keyword_arguments_are_the_cli_overrides() -> None:
    assert to_overrides(
        {
            "quant": "twn",
            "trainer__max_epochs": 2,
            "eval": {"attacks": ["fgsm", "pgd20"], "eps": 0.1},
            "init_from": None,
            "compile": False,
            "tags": ["a b", "c"],
        },
        ["+trainer.limit_val_batches=2"],
    ) == [
        "+trainer.limit_val_batches=2",
        "quant=twn",
        "trainer.max_epochs=2",
        "eval.attacks=[fgsm,pgd20]",
        "eval.eps=0.1",
        "init_from=null",
        "compile=false",
        "tags=['a b',c]",
    ]
    assert to_overrides({"ckpt_path": "runs/a=b,c.ckpt"}) == ["ckpt_path='runs/a=b,c.ckpt'"]
    with pytest.raises(ESQUserError, match="must be a str, number"):
        to_overrides({"seed": object()})


def test_import_is_cheap_and_a_config_error_fails_before_torch(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom esq_lightning import train, evaluate, export, load_model, load_results\n"
        "assert 'torch' not in sys.modules, 'import pulled in torch'\n"
        "from esq_lightning.errors import ESQUserError\n"
        "try:\n    train(callbacks__quant_ratio__start=0)\nexcept ESQUserError as exc:\n    print('error:', exc)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    proc = run_python(code, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "error: callbacks.quant_ratio.start: 0 is out of range" in proc.stdout
    assert "torch imported: False" in proc.stdout


def test_the_api_functions_share_no_name_with_a_module() -> None:
    """The package's API names are functions; the modules behind them live in subpackages with other names."""
    import esq_lightning
    from esq_lightning import api
    from esq_lightning.artifacts.export import export_checkpoint  # noqa: F401  (loads every module behind the API)
    from esq_lightning.artifacts.loading import (
        build_network,  # noqa: F401
        load_trained_model,  # noqa: F401
    )

    for name in esq_lightning.API:
        assert getattr(esq_lightning, name) is getattr(api, name), name
        assert f"esq_lightning.{name}" not in sys.modules, name


def test_load_results_and_load_model_errors(tmp_path: Path) -> None:
    from esq_lightning import load_model, load_results

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"task": "train", "clean_acc": 0.5}))
    assert load_results(run / "results.json") == {"task": "train", "clean_acc": 0.5}
    assert load_results(tmp_path) == [{"task": "train", "clean_acc": 0.5}]
    with pytest.raises(ESQUserError, match="no such results file or run directory"):
        load_results(tmp_path / "missing")
    with pytest.raises(ESQUserError, match="no such checkpoint or packed model file"):
        load_model(tmp_path / "missing.ckpt")
