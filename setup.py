"""The Hydra configs live in the top-level conf/ folder and install as the package esq_lightning.conf,
so `esq-train` finds them from any working directory."""

from setuptools import find_namespace_packages, find_packages, setup

# Every folder of conf/ is declared as a package (esq_lightning.conf.model, esq_lightning.conf.experiment.digits,
# ...) with its YAML files as package data, so setuptools has nothing to guess (and nothing to warn about).
CONF_PACKAGES = ["esq_lightning.conf"] + [
    f"esq_lightning.conf.{name}" for name in find_namespace_packages(where="conf", exclude=["*__pycache__*"])
]

setup(
    packages=find_packages(include=["esq_lightning", "esq_lightning.*"]) + CONF_PACKAGES,
    package_dir={"esq_lightning.conf": "conf"},
    package_data={name: ["*.yaml"] for name in CONF_PACKAGES},
)
