"""The config: its validation (schema.py), the OmegaConf resolvers (resolvers.py), the derived setting labels (labels.py).

Nothing here imports torch: esq-train checks a config before torch is imported.
"""
