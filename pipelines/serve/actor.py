"""The two stages of `batch-infer`'s Ray Data pipeline: decode + crop tasks (`load_crops`) and
the model actors (`Predictor`, one loaded model each, top-5 classes and probabilities).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.serve.output import SCHEMA
from pipelines.serve.predict import InferError, ModelRef, topk

TOP = 5

# Memory a decode task reserves per image besides its crops: a decoded photo of up to ~2 MP
# with its rescaled copy (ILSVRC photos average ~0.2 MP; larger ones still run: this is a
# scheduling estimate, not a limit).
DECODED_IMAGE_BYTES = 8 << 20


# --------------------------------------------------------------------------- decode (tasks)
def load_crops(batch: dict[str, np.ndarray], geometries: list[tuple[int, int]],
               ten_crop: bool, label_map: list[int] | None = None) -> dict[str, np.ndarray]:
    """Read and decode each input, then each model geometry's rescale + crop (Ray tasks, CPU).
    A shard record's label goes through `label_map` (OUT index -> model index, see
    `shard_label_map`) when the OUT's class list is not the model's.

    Returns the batch with `crops_<g>` uint8 [N, S, S, 3] ([N, 10, S, S, 3] with ten_crop)
    per geometry g, and `error` ("" when fine); a failed row keeps zero pixels."""
    from pipelines.data.decode import decode_rgb
    from pipelines.data.shards import ShardReader, decode_image
    from pipelines.serve.bundle import make_crops

    n = len(batch["path"])
    shape = (10,) if ten_crop else ()
    crops = [np.zeros((n, *shape, size, size, 3), np.uint8) for _, size in geometries]
    errors = [""] * n
    paths = batch["path"].astype(object).copy()
    shards = np.array([""] * n, dtype=object)  # "" = not a shard (None would become NaN)
    labels = batch["label"].copy()
    readers: dict[str, ShardReader] = {}
    for i, (src, kind) in enumerate(zip(batch["path"], batch["kind"], strict=True)):
        if batch["error"][i]:  # found at listing time (a label not in the class index, ...)
            errors[i] = str(batch["error"][i])
            continue
        try:
            if kind == "shard":
                shards[i], paths[i] = src, f"{src}#{int(batch['record'][i])}"
                reader = readers.get(src) or readers.setdefault(src, ShardReader(src))
                rec = reader[int(batch["record"][i])]
                paths[i] = rec.path
                labels[i] = rec.label if label_map is None or rec.label < 0 else \
                    label_map[rec.label]
                rgb = decode_image(rec)
            else:
                with open(src, "rb") as fh:
                    data = fh.read()
                rgb = decode_rgb(data)
            for g, geom in enumerate(geometries):
                crops[g][i] = make_crops(rgb, geom, ten_crop)
        except OSError as exc:
            errors[i] = f"unreadable: {exc.strerror or exc}"
        except Exception as exc:  # noqa: BLE001 - one bad input is a row, never a failed job
            errors[i] = str(exc) or type(exc).__name__
    out = {"path": paths.astype(str), "shard": shards, "record": batch["record"],
           "label": labels, "error": np.array(errors, dtype=object)}
    out.update({f"crops_{g}": c for g, c in enumerate(crops)})
    return out


# --------------------------------------------------------------------------- model (actors)
def model_source(ref: ModelRef, ship: bool) -> dict:
    """Where an actor finds a model: the bundle dir, readable by actors on the driver's node
    (and on others when it is on shared storage); with `ship`, also inference.json and the
    weights' bytes in the object store, for nodes that cannot see that dir. A single-node
    Ray ships nothing: 240 MB of weights would be copied into the store for no reader."""
    import ray

    from pipelines.serve.bundle import INFERENCE, WEIGHTS

    bundle = Path(ref.bundle)
    info = (bundle / INFERENCE).read_text()
    blob = ray.put({"info": info, "weights": (bundle / WEIGHTS).read_bytes()}) if ship else None
    return {"dir": str(bundle), "info": info, "blob": [blob]}  # a list: no auto-resolve


class Predictor:
    """Runs the ensemble on an actor; builds it once per actor, not once per batch."""

    def __init__(self, sources: list[dict], model_uri: str, model_version: str | None,
                 gpu: bool, amp: bool, threads: int):
        import ray
        import torch

        from pipelines.serve.bundle import INFERENCE, WEIGHTS
        from pipelines.serve.predict import Ensemble

        torch.set_num_threads(max(1, threads))
        with tempfile.TemporaryDirectory(prefix="alexnet-actor-") as tmp:
            dirs = []
            for i, src in enumerate(sources):
                here = Path(src["dir"])
                if (here / WEIGHTS).is_file() and (here / INFERENCE).is_file() and \
                        (here / INFERENCE).read_text() == src["info"]:
                    dirs.append(str(here))  # same node or shared storage: read it directly
                    continue
                if src["blob"][0] is None:
                    raise InferError(f"model bundle {here} is not readable on this node and "
                                     "was not shipped")
                blob = ray.get(src["blob"][0])
                d = Path(tmp) / str(i)
                d.mkdir()
                (d / INFERENCE).write_text(blob["info"])
                (d / WEIGHTS).write_bytes(blob["weights"])
                del blob
                dirs.append(str(d))
            self.ensemble = Ensemble(dirs, "cuda" if gpu else "cpu", amp=amp)
        classes = self.ensemble.classes
        self.wnids = np.array([c["wnid"] for c in classes], dtype=object)
        self.names = np.array([c["name"] for c in classes], dtype=object)
        self.model_uri, self.model_version = model_uri, model_version

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = batch["error"] == ""
        n = len(ok)
        k = min(TOP, len(self.wnids))
        top_i = np.zeros((n, k), np.int64)
        top_p = np.zeros((n, k), np.float32)
        if ok.any():
            crops = [batch[f"crops_{g}"][ok] for g in range(len(self.ensemble.geometries))]
            top_i[ok], top_p[ok] = topk(self.ensemble.predict(crops), k)
        labels = np.asarray(batch["label"], np.int64)
        known = labels >= 0
        scored = ok & known

        def rows(values: np.ndarray, mask: np.ndarray) -> list:
            return [v if m else None for v, m in zip(values.tolist(), mask, strict=True)]

        return pa.table({
            "path": pa.array(batch["path"].astype(str), pa.string()),
            "shard": pa.array(rows(batch["shard"].astype(str), batch["shard"] != ""),
                              pa.string()),
            "record": pa.array(rows(batch["record"], batch["record"] >= 0), pa.int64()),
            "top5_index": pa.array(rows(top_i, ok), SCHEMA.field("top5_index").type),
            "top5_wnid": pa.array(rows(self.wnids[top_i], ok), SCHEMA.field("top5_wnid").type),
            "top5_name": pa.array(rows(self.names[top_i], ok), SCHEMA.field("top5_name").type),
            "top5_prob": pa.array(rows(top_p, ok), SCHEMA.field("top5_prob").type),
            "label": pa.array(rows(labels, known), pa.int64()),
            "label_wnid": pa.array(rows(self.wnids[labels.clip(0)], known), pa.string()),
            "correct_top1": pa.array(rows(top_i[:, 0] == labels, scored), pa.bool_()),
            "correct_top5": pa.array(rows((top_i == labels[:, None]).any(1), scored),
                                     pa.bool_()),
            "error": pa.array(rows(batch["error"], ~ok), pa.string()),
            "model_uri": pa.array([self.model_uri] * n, pa.string()),
            "model_version": pa.array([self.model_version] * n, pa.string()),
        }, schema=SCHEMA)
