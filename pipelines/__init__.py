"""Prefect flows: the operator that chains the steps of `mnist_mlops` and is what schedules run."""
