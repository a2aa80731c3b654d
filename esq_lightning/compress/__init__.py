"""Compression beyond uniform quantization: robust pruning (masks.py, pruning.py) and mixed precision per layer (mixed.py).

Kept free of imports on purpose: esq_lightning.quant.modules reads the pruning state of a layer from masks.py.
"""
