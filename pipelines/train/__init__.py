"""Training: the launcher (`workflow.py train`), the per-worker loop Ray Train runs, the
input pipeline from shards, MLflow tracking and the registry, and starting from weights."""
