"""Shared test set-up: one torch thread per process, so pytest-xdist workers do not oversubscribe."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch

torch.set_num_threads(1)
