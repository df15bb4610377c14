"""Platform: MLflow set-up, DVC calls, locks, Prefect servers and helper processes, preloading."""
