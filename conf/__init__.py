"""Hydra configs of esq-lightning, installed as the package `esq_lightning.conf`."""
