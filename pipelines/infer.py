"""Batch inference with a registered model on Ray Data.

    python workflow.py batch-infer --model models:/alexnet@champion --input data/sample/val \
        --output predictions.parquet

Stages: list inputs (a folder tree of images, or the shards of a preprocessed OUT) ->
map_batches(read + decode + the model's own rescale/centre crop) in tasks ->
map_batches(Predictor) on an actor pool (the model loads once per actor) -> Parquet,
written as the batches stream back, so memory stays flat whatever the input size.
A file that does not decode becomes a row with `error` set and no prediction.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import InferConfig
from pipelines.runtime import init_ray
from pipelines.sources import IMAGE_EXTENSIONS


class InferError(RuntimeError):
    """Inference cannot start; the message says why and what to do."""


# --------------------------------------------------------------------------- model reference
def _registry_choices(name: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{name}'")
        aliases = client.get_registered_model(name).aliases
    except Exception:  # noqa: BLE001 - we are only building an error message
        names = [m.name for m in client.search_registered_models()]
        return f"no registered model {name!r}; registered models: {names or 'none'}"
    return (f"versions of {name!r}: {sorted(int(v.version) for v in versions)}; "
            f"aliases: {dict(aliases) or 'none'}")


def resolve_model(ref: str) -> str:
    """A local bundle directory for `ref` (models:/, runs:/ or a local checkpoint dir)."""
    from pipelines.model_package import INFERENCE

    if os.path.isdir(ref):
        if (Path(ref) / INFERENCE).is_file():
            return ref
        if (Path(ref) / "artifacts" / "bundle" / INFERENCE).is_file():
            return str(Path(ref) / "artifacts" / "bundle")
        raise InferError(f"{ref} is a directory but not a model bundle (no {INFERENCE})")
    import mlflow

    from pipelines.tracking import setup_mlflow

    setup_mlflow()
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for "not found"
        hint = ""
        if ref.startswith("models:/"):
            name = ref[len("models:/"):].split("@")[0].split("/")[0]
            hint = "; " + _registry_choices(name)
        raise InferError(f"model {ref!r} not found ({type(exc).__name__}){hint}") from None
    bundle = Path(local) / "artifacts" / "bundle"
    if not (bundle / INFERENCE).is_file():
        raise InferError(f"{ref} is not an alexnet-workflow model (no artifacts/bundle)")
    return str(bundle)


# --------------------------------------------------------------------------- inputs
def list_inputs(path: str, split: str, classes: list[dict]) -> pa.Table:
    """Rows of (source, shard, index, label): files of a folder tree, or records of shards."""
    from pipelines.shards import MANIFEST, read_manifest

    root = Path(path)
    wnid_index = {c["wnid"]: c["index"] for c in classes}
    if (root / MANIFEST).is_file():
        manifest = read_manifest(root)
        if split not in manifest["splits"]:
            raise InferError(f"{root} has no split {split!r}; it has {list(manifest['splits'])}")
        rows = [(s["path"], i) for s in manifest["splits"][split]["shards"]
                for i in range(s["records"])]
        return pa.table({"source": [str(root / p) for p, _ in rows],
                         "index": [i for _, i in rows], "label": [-1] * len(rows),
                         "kind": ["shard"] * len(rows)})
    if not root.is_dir():
        raise InferError(f"input {root} is neither a folder of images nor a preprocess OUT")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    if not files:
        raise InferError(f"no images under {root} (extensions {sorted(IMAGE_EXTENSIONS)})")
    # A file in a folder named after a known wnid has that label (ImageNet/ImageFolder trees).
    labels = [wnid_index.get(Path(f).parent.name, -1) for f in files]
    return pa.table({"source": files, "index": [-1] * len(files), "label": labels,
                     "kind": ["file"] * len(files)})


def load_crops(batch: dict[str, np.ndarray], info: dict) -> dict[str, np.ndarray]:
    """Read and decode each input, then the model's rescale + centre crop (tasks, CPU)."""
    from pipelines.decode import DecodeError, decode_rgb
    from pipelines.model_package import preprocess_image
    from pipelines.shards import RecordError, ShardReader, decode_image

    size = info["input_size"]
    n = len(batch["source"])
    images = np.zeros((n, size, size, 3), np.uint8)
    errors = [""] * n
    labels = batch["label"].copy()
    readers: dict[str, ShardReader] = {}
    for i, (src, kind) in enumerate(zip(batch["source"], batch["kind"], strict=True)):
        try:
            if kind == "shard":
                reader = readers.setdefault(src, ShardReader(src))
                rec = reader[int(batch["index"][i])]
                rgb, labels[i] = decode_image(rec), rec.label
            else:
                with open(src, "rb") as fh:
                    rgb = decode_rgb(fh.read())
            images[i] = preprocess_image(rgb, info)
        except (DecodeError, RecordError) as exc:
            errors[i] = str(exc)
        except OSError as exc:
            errors[i] = f"unreadable: {exc.strerror or exc}"
    return {"source": batch["source"], "index": batch["index"], "label": labels,
            "image": images, "error": np.array(errors)}


class Predictor:
    """Runs the model on an actor; loads it once per actor, not once per batch."""

    def __init__(self, bundle_dir: str, model_uri: str, gpu: bool):
        import torch

        from pipelines.model_package import load_bundle

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = "cuda" if gpu else "cpu"
        self.model, self.info = load_bundle(bundle_dir, self.device)
        self.classes = self.info["classes"]
        self.model_uri = model_uri

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from pipelines.model_package import predict_proba

        ok = batch["error"] == ""
        n, k = len(ok), min(5, len(self.classes))
        top_i = np.full((n, k), -1, np.int64)
        top_p = np.zeros((n, k), np.float32)
        if ok.any():
            probs = predict_proba(self.model, batch["image"][ok], self.info, self.device)
            idx = np.argsort(-probs, axis=1)[:, :k]
            top_i[ok], top_p[ok] = idx, np.take_along_axis(probs, idx, axis=1)
        labels = batch["label"]
        known = ok & (labels >= 0)

        def per_row(values, mask):
            return [v if m else None for v, m in zip(values, mask, strict=True)]

        wnids = [[self.classes[j]["wnid"] for j in row] for row in top_i.clip(0)]
        names = [[self.classes[j]["name"] for j in row] for row in top_i.clip(0)]
        return pa.table({
            "path": batch["source"].astype(str),
            "record": batch["index"],
            "top5_index": per_row(top_i.tolist(), ok),
            "top5_wnid": per_row(wnids, ok),
            "top5_name": per_row(names, ok),
            "top5_prob": per_row(top_p.tolist(), ok),
            "label": per_row(labels.tolist(), labels >= 0),
            "correct_top1": per_row((top_i[:, 0] == labels).tolist(), known),
            "correct_top5": per_row((top_i == labels[:, None]).any(1).tolist(), known),
            "error": per_row(batch["error"].tolist(), ~ok),
            "model_uri": [self.model_uri] * n,
        })


def run_batch_infer(cfg: InferConfig) -> dict:
    """Run inference; writes cfg.output and returns counts and accuracy."""
    import ray

    from pipelines.model_package import load_info

    started = time.time()
    bundle = resolve_model(cfg.model)
    info = load_info(bundle)
    inputs = list_inputs(cfg.input, cfg.split, info["classes"])
    out = Path(cfg.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InferError(f"cannot create {out.parent}: {exc}") from exc
    init_ray(log_to_driver=False)
    block = max(1, cfg.batch_size)
    ds = ray.data.from_arrow([inputs.slice(o, block) for o in range(0, inputs.num_rows, block)])
    ds = ds.map_batches(load_crops, batch_size=cfg.batch_size, batch_format="numpy",
                        fn_kwargs={"info": info})
    ds = ds.map_batches(Predictor, batch_size=cfg.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"bundle_dir": bundle, "model_uri": cfg.model,
                                               "gpu": cfg.gpu},
                        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
                        num_gpus=1 if cfg.gpu else 0)
    rows = errors = labelled = top1 = top5 = 0
    writer: pq.ParquetWriter | None = None
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += table.num_rows
            errors += table.num_rows - table["error"].null_count
            c1 = table["correct_top1"].drop_null().to_pylist()
            labelled += len(c1)
            top1 += sum(c1)
            top5 += sum(table["correct_top5"].drop_null().to_pylist())
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, out)
    result = {"output": str(out), "images": rows, "errors": errors, "labelled": labelled,
              "seconds": round(time.time() - started, 2),
              "model": cfg.model}
    if labelled:
        result["top1_accuracy"] = top1 / labelled
        result["top5_accuracy"] = top5 / labelled
    return result
