"""Console entry points: esq-train, esq-eval, esq-export."""
