"""Serving: the model bundle (weights + inference.json), batch inference on Ray Data,
`predict` for a few files, the MLflow pyfunc entry point and export to ONNX/TorchScript.
Only `bundle`, `pyfunc_model` and `pipelines.data.decode` travel with a logged model."""
