"""What each command does, over the libraries: esq-train (train.py), esq-eval (evaluate.py, its loggers in
eval_loggers.py), esq-report (report.py), and the config checks that import torch (checks.py). The cli mains
and the Python API call these; nothing below this layer imports it (docs/architecture.md)."""
