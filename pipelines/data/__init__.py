"""Data: source layouts -> decode -> LMDB shards + manifest (`workflow.py preprocess`),
`verify`, the shard format and the synthetic sample. Nothing here imports torch."""
