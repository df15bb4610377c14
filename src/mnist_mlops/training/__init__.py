"""Training: data sources, prepare, the model, training, evaluation, figures, DVC stages, sweeps."""
