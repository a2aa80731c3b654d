"""Compression beyond one bit width: robust pruning (pruning.py) and mixed precision per layer (mixed.py).

A layer's pruning state (its keep mask and HYDRA scores) lives in quant/masks.py, below this package: the
quantized layers and the packed format read it.
"""
