"""Installs: package data declared (no setuptools warnings), the lock file used by `make setup`, every documented
option installable, library notices filtered, the versions recorded in results."""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys
import warnings
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"constraints.txt: {line!r} is not name==version"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_make_setup_installs_with_the_lock_file() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS \?= constraints\.txt$", makefile, re.M)
    rule = makefile.split("$(VENV)/.installed:", 1)[1].split("\nsetup:", 1)[0]
    assert "$(CONSTRAINTS)" in rule.splitlines()[0]  # a new lock file re-runs setup
    assert re.search(r"pip install .*-c \$\(CONSTRAINTS\) -e \"\.\[\$\(EXTRAS\)\]\"", rule)
    assert re.search(r"^EXTRAS \?= .*tensorboard", makefile, re.M)
    assert re.search(r"^lock:", makefile, re.M) and "pip freeze --exclude-editable" in makefile


def test_lock_file_pins_what_is_installed_and_ranges_stay_loose() -> None:
    pins = _constraints()
    assert {"pytorch-lightning", "wandb", "numpy", "hydra-core", "tensorboard"} <= set(pins)
    assert "torch" not in pins and "esq-lightning" not in pins  # TORCH_SPEC pins torch (CPU or CUDA build)
    for name in ("pytorch-lightning", "wandb", "numpy", "hydra-core", "omegaconf"):
        assert metadata.version(name) == pins[name], f"{name}: installed {metadata.version(name)}, locked {pins[name]}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if "==" in d], deps


def test_logger_tensorboard_is_installed_by_an_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("tensorboard") for d in extras["tensorboard"])
    assert importlib.util.find_spec("tensorboard") is not None


def test_onnx_export_is_an_extra_that_make_setup_installs_pinned() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {d.split(">")[0] for d in extras["onnx"]} == {"onnx", "onnxruntime"}
    assert re.search(r"^EXTRAS \?= .*\bonnx\b", (ROOT / "Makefile").read_text(), re.M)
    pins = _constraints()
    for name in ("onnx", "onnxruntime"):
        assert name in pins and metadata.version(name) == pins[name], name


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools in the venv")
def test_wheel_builds_without_packaging_warnings_and_ships_every_config(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "absent from the `packages` configuration" not in output
    assert "BuildBackendWarning: Package" not in output
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in (ROOT / "conf").rglob("*.yaml"):
        assert f"esq_lightning/conf/{yaml.relative_to(ROOT / 'conf').as_posix()}" in names, yaml


def test_library_notices_are_filtered_precisely(caplog: pytest.LogCaptureFixture) -> None:
    from esq_lightning.notices import filter_warnings, quiet_library_notices

    quiet_library_notices()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_warnings()  # catch_warnings reset the filters; these go on top of "always"
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("a warning of our own", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning of our own"]
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    # The device lines are said once per process: forget what earlier tests of this worker already said.
    from esq_lightning.notices import _Once

    for f in logger.filters:
        if isinstance(f, _Once):
            f.seen.clear()
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging, try installing [litlogger](https://pypi.org/project/x/)")
        logger.info("GPU available: False, used: False")
        logger.info("GPU available: False, used: False")  # a second Trainer in the process: not repeated
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_wandb_logger_passes_no_anonymous_setting() -> None:
    from pytorch_lightning.loggers import WandbLogger

    from esq_lightning.notices import quiet_wandb_logger

    logger = quiet_wandb_logger(WandbLogger(project="p", offline=True, save_dir="/nonexistent-never-created"))
    assert "anonymous" not in logger._wandb_init
    assert "anonymous" in quiet_wandb_logger(WandbLogger(project="p", offline=True, anonymous=True))._wandb_init


def test_results_record_the_package_versions() -> None:
    from omegaconf import OmegaConf

    from esq_lightning.artifacts.results import build_results

    cfg = OmegaConf.create(
        {
            "data": {"name": "digits"},
            "model": {"name": "small_cnn"},
            "method": {"name": "esq"},
            "quant": {"kind": "bwn", "bits": 1},
            "seed": 0,
            "eval": {"eps": 0.1},
        }
    )
    record = build_results(cfg, {"clean_acc": 1.0, "robust_acc": {}, "attacks": {}, "n_samples": 1})
    versions = record["versions"]
    assert versions["torch"] == metadata.version("torch") and versions["pytorch-lightning"] == metadata.version(
        "pytorch-lightning"
    )
    assert versions["numpy"] == metadata.version("numpy") and versions["python"].count(".") == 2
