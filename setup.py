"""The Hydra configs live in the top-level conf/ folder and install as the package esq_lightning.conf,
so `esq-train` finds them from any working directory."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["esq_lightning", "esq_lightning.*"]) + ["esq_lightning.conf"],
    package_dir={"esq_lightning.conf": "conf"},
    package_data={"esq_lightning.conf": ["*.yaml", "**/*.yaml"]},
)
