"""MLflow pyfunc entry point for a logged AlexNet ("models from code": this file is copied
into the model's artifacts and run on load, nothing is unpickled).

    import mlflow
    model = mlflow.pyfunc.load_model("models:/alexnet@champion")
    probs = model.predict(images)   # uint8 RGB [N, H, W, 3], any H, W >= 1

Input images are rescaled and centre-cropped with the model's own settings (inference.json);
the output is the softmax probability of every class, [N, num_classes] float32.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class AlexNetPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from pathlib import Path

        from pipelines.serve.model import load_bundle

        self.model, self.info = load_bundle(Path(context.artifacts["bundle"]))

    # The np.ndarray hint is one MLflow takes as "no schema from type hints": the logged
    # signature (a named uint8 tensor) stays the contract, and MLflow no longer warns
    # "Add type hints to the `predict` method" at every log and load.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        from pipelines.serve.model import predict_proba, preprocess_image

        if isinstance(model_input, dict):  # a named tensor signature passes {"images": ...}
            model_input = model_input["images"]
        images = np.asarray(model_input, dtype=np.uint8)
        if images.ndim == 3:
            images = images[None]
        crops = np.stack([preprocess_image(img, self.info) for img in images])
        return predict_proba(self.model, crops, self.info).astype(np.float32)


mlflow.models.set_model(AlexNetPyfunc())
