"""The jobs Ray runs, one sub-package a stage:

- `pipelines.data`: `workflow.py preprocess` and `verify` (sources -> LMDB shards + manifest),
  the shard format, and the sample dataset.
- `pipelines.train`: `workflow.py train` (the launcher, the per-worker loop, its input and
  MLflow tracking) and starting from weights.
- `pipelines.serve`: what a trained model is (the bundle), `batch-infer`, `predict`, `export`.

Shared by all three: `config` (every job's typed config) and `runtime` (which Ray), plus
`precision` (bf16/AMP where the hardware has it) for training and serving.
"""
