"""Training: the LightningModule, objectives, callbacks, RNG streams, checkpoint I/O and loggers; esq-train's run (train.py)."""
