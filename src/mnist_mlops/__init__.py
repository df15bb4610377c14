"""mnist-mlops: a ConvNet on MNIST, trained by Prefect, versioned by DVC, tracked by MLflow, served by BentoML."""

__version__ = "0.1.0"
