"""The commands of `mnist-mlops` by role; `mnist_mlops.cli` is their map and the entry point."""
