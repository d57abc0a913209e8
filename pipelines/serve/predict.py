"""Consuming registered models: resolve a reference, load one model or an ensemble, predict.

    python workflow.py predict cat.jpg dog.png [--model models:/alexnet@champion] [--ten-crop]

What `batch-infer`'s actors and `workflow.py predict` share, with no Ray in it:

- `resolve_model(ref)`: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/PATH` or
  a local checkpoint directory -> a `ModelRef` (a local bundle dir, plus the registry name,
  version and training run id when known). A reference that does not exist raises
  `InferError` listing what does exist.
- `Ensemble`: one model or several whose softmax outputs are averaged (the paper's 5- and
  7-CNN results), each fed with its own preprocessing from its `inference.json` (rescale,
  input size, mean/std), never from flags that could disagree with it; `ten_crop` averages
  the softmax over the paper's ten crops (corners + centre of the resize x resize square,
  and their mirrors).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.serve.bundle import INFERENCE, geometry, make_crops, read_info

DEFAULT_MODEL = "models:/alexnet@champion"



class InferError(RuntimeError):
    """Inference cannot start; the message says why and what to do."""


# --------------------------------------------------------------------------- references
@dataclass(frozen=True)
class ModelRef:
    uri: str                   # as the user gave it
    bundle: str                # local directory with weights.pt + inference.json
    name: str | None = None    # Model Registry name, when known
    version: str | None = None
    run_id: str | None = None  # the training run that logged it, when known
    model_id: str | None = None  # MLflow 3 LoggedModel id (evaluation metrics link to it)


def _registry_choices(client, name: str) -> str:
    try:
        versions = client.search_model_versions(f"name='{name}'")
        aliases = client.get_registered_model(name).aliases
    except Exception:  # noqa: BLE001 - only building an error message
        names = sorted(m.name for m in client.search_registered_models())
        return f"no registered model {name!r}; registered models: {names or 'none'}"
    named = ", ".join(f"{a}={v}" for a, v in sorted(dict(aliases).items())) or "none"
    return f"versions of {name!r}: {sorted(int(v.version) for v in versions)}; aliases: {named}"


def _logged_model_id(mv) -> str | None:
    """The MLflow 3 LoggedModel behind a model version: its `model_id`, or (as versions
    registered from a `models:/m-...` URI carry it) the id in its source."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = getattr(mv, "source", "") or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def _local_bundle(ref: str) -> str:
    root = Path(ref)
    for candidate in (root, root / "artifacts" / "bundle"):  # a bundle / checkpoint, or a
        if (candidate / INFERENCE).is_file():                 # downloaded MLflow model dir
            return str(candidate)
    ckpts = sorted(p.parent.name for p in root.glob(f"*/{INFERENCE}"))
    hint = f"; it holds checkpoints {ckpts}: pass one of them" if ckpts else ""
    raise InferError(f"{ref} is a directory but not a model bundle (no {INFERENCE}){hint}")


def resolve_model(ref: str, dst: str | None = None) -> ModelRef:
    """Find `ref` and make its bundle local (MLflow references are downloaded into `dst`,
    a directory the caller deletes when the weights are loaded; None: an MLflow temp dir)."""
    if os.path.isdir(ref):
        return ModelRef(uri=ref, bundle=_local_bundle(ref))
    if not ref.startswith(("models:/", "runs:/")):
        if "://" in ref:
            raise InferError(f"model {ref!r}: use models:/NAME@ALIAS, models:/NAME/VERSION, "
                             "runs:/RUN_ID/model or a local checkpoint directory")
        raise InferError(f"model {ref!r}: no such directory (and not a models:/ or runs:/ URI)")

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.train.tracking import setup_mlflow

    setup_mlflow()
    client = MlflowClient()
    name = version = run_id = model_id = None
    body = ref[len("models:/"):].strip("/") if ref.startswith("models:/") else ""
    if body.startswith("m-") and "/" not in body and "@" not in body:
        # An MLflow 3 LoggedModel (what `log_model` returns): the model itself, registered
        # or not. Its training run is known; a registry version is not asked for.
        try:
            logged = client.get_logged_model(body)
        except MlflowException:
            raise InferError(f"model {ref!r}: no logged model {body!r} in "
                             f"{mlflow.get_tracking_uri()}") from None
        uri, run_id, model_id = ref, logged.source_run_id, body
    elif ref.startswith("models:/"):
        name, alias = body.split("@", 1) if "@" in body else (body.split("/")[0], None)
        number = body.split("/", 1)[1] if alias is None and "/" in body else None
        try:
            if alias is not None:
                mv = client.get_model_version_by_alias(name, alias)
            elif number is not None and number.isdigit():
                mv = client.get_model_version(name, number)
            else:
                raise InferError(f"model {ref!r}: use models:/{name}@ALIAS or "
                                 f"models:/{name}/VERSION; {_registry_choices(client, name)}")
        except MlflowException:
            raise InferError(f"model {ref!r} not found; {_registry_choices(client, name)}") \
                from None
        version, run_id = str(mv.version), mv.run_id
        model_id = _logged_model_id(mv)
        uri = f"models:/{name}/{version}"  # an alias can move: pin what was resolved
    else:
        parts = ref[len("runs:/"):].strip("/").split("/", 1)
        run_id, path = parts[0], (parts[1] if len(parts) > 1 else "")
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise InferError(f"model {ref!r}: no run {run_id!r} in {mlflow.get_tracking_uri()}") \
                from None
        uri = ref
        # The registered version made from this run, if exactly one: its number goes in the output.
        versions = client.search_model_versions(f"run_id='{run_id}'")
        if len(versions) == 1:
            name, version = versions[0].name, str(versions[0].version)
            model_id = _logged_model_id(versions[0])
        if not path:
            raise InferError(f"model {ref!r}: name the model's path in the run, e.g. "
                             f"runs:/{run_id}/model")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for "not found"
        extra = ""
        if ref.startswith("runs:/"):
            # MLflow 3 keeps logged models beside the run's artifacts, as LoggedModels.
            outputs = getattr(run, "outputs", None)
            models = sorted({client.get_logged_model(output.model_id).name
                             for output in (outputs.model_outputs if outputs else [])})
            arts = [a.path for a in client.list_artifacts(run_id)]
            extra = f"; run {run_id} has models {models or 'none'}, artifacts {arts or 'none'}"
        raise InferError(f"model {ref!r} could not be downloaded "
                         f"({type(exc).__name__}: {str(exc)[:200]}){extra}") from None
    bundle = Path(local) / "artifacts" / "bundle"
    if not (bundle / INFERENCE).is_file():
        raise InferError(f"{ref} is not an alexnet-workflow model (no artifacts/bundle/{INFERENCE})")
    return ModelRef(uri=ref, bundle=str(bundle), name=name, version=version, run_id=run_id,
                    model_id=model_id)


def resolve_models(refs: list[str] | str, dst: str | None = None) -> list[ModelRef]:
    """Resolve every member of an ensemble; they must share one class index."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        refs = [DEFAULT_MODEL]
    resolved = []
    for i, ref in enumerate(refs):
        if not isinstance(ref, str) or not ref:
            raise InferError(f"--model #{i + 1}: expected a model reference, got {ref!r}")
        sub = None
        if dst is not None:
            sub = os.path.join(dst, str(i))
            os.makedirs(sub, exist_ok=True)
        resolved.append(resolve_model(ref, sub))
    wnids = [[c["wnid"] for c in read_info(m.bundle)["classes"]] for m in resolved]
    for m, w in zip(resolved[1:], wnids[1:], strict=True):
        if w != wnids[0]:
            raise InferError(f"ensemble: {m.uri} has a different class index than "
                             f"{resolved[0].uri} ({len(w)} vs {len(wnids[0])} classes); "
                             "only models of one class index can be averaged")
    return resolved


# --------------------------------------------------------------------------- models
class Ensemble:
    """One or more models whose softmax outputs are averaged; loads each once."""

    def __init__(self, bundles: list[str], device: str = "cpu", amp: bool = False):
        import torch

        from pipelines.serve.model import load_bundle

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InferError("--gpu: this process sees no CUDA device")
        self.members = [load_bundle(b, str(self.device)) for b in bundles]
        self.infos = [info for _, info in self.members]
        self.classes = self.infos[0]["classes"]
        self.geometries = sorted({geometry(i) for i in self.infos})
        self.member_geometry = [self.geometries.index(geometry(i)) for i in self.infos]
        # bf16 autocast + channels_last on GPUs and on CPUs with native bf16 (fp16 on GPUs
        # without bf16), fp32 elsewhere: pipelines.precision decides, as for training. bf16's
        # range is fp32's, and alexnet.lrn sums LRN's squares in fp32.
        from pipelines import precision

        self.amp_dtype = precision.amp_dtype(self.device, amp, inference=True)
        self.channels_last = self.amp_dtype is not None
        if self.channels_last:
            self.members = [(m.to(memory_format=torch.channels_last), i) for m, i in self.members]

    def crops(self, rgb: np.ndarray, ten_crop: bool) -> list[np.ndarray]:
        return [make_crops(rgb, g, ten_crop) for g in self.geometries]

    def predict(self, crops: list[np.ndarray]) -> np.ndarray:
        """crops[g]: uint8 [N, S, S, 3] or [N, 10, S, S, 3] for geometry g -> mean softmax
        probabilities [N, classes] float32 (mean over the ten crops, then over the models)."""
        import torch

        from pipelines.serve.model import to_input

        total = None
        with torch.inference_mode():
            for (model, info), g in zip(self.members, self.member_geometry, strict=True):
                x = np.asarray(crops[g])
                n = x.shape[0]
                flat = x.reshape(-1, *x.shape[-3:])
                if self.device.type == "cuda":
                    flat = torch.from_numpy(np.ascontiguousarray(flat)).pin_memory()
                inp = to_input(flat, info, self.device)
                if self.amp_dtype is not None:
                    inp = inp.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(self.device.type, dtype=self.amp_dtype):
                        logits = model(inp)
                else:
                    logits = model(inp)
                probs = torch.softmax(logits.float(), dim=1).view(n, -1, logits.shape[1]).mean(1)
                total = probs if total is None else total + probs
        return (total / len(self.members)).cpu().numpy()


# --------------------------------------------------------------------------- predict command
def topk(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices [N, k] by descending probability (ties: lower index first) and their values."""
    k = min(k, probs.shape[1])
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(probs, idx, axis=1)


def predict_files(paths: list[str], models: list[str] | str | None = None,
                  ten_crop: bool = False, top: int = 5, amp: bool = True) -> list[dict]:
    """Top-k classes of each image file, in one process, without Ray. Returns one dict per
    path: {path, top: [{index, wnid, name, prob}]} or {path, error}; a file that does not
    decode is an entry with `error`, not an exception."""
    import tempfile

    from pipelines.data.decode import decode_rgb

    with tempfile.TemporaryDirectory(prefix="alexnet-predict-") as tmp:
        refs = resolve_models(models or [DEFAULT_MODEL], tmp)
        ensemble = Ensemble([r.bundle for r in refs], amp=amp)  # weights in memory now
    results: list[dict] = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                rgb = decode_rgb(fh.read())
            crops = [c[None] for c in ensemble.crops(rgb, ten_crop)]
        except OSError as exc:
            results.append({"path": path, "error": f"unreadable: {exc.strerror or exc}"})
            continue
        except Exception as exc:  # noqa: BLE001 - one bad image is a line, never a crash
            results.append({"path": path, "error": str(exc) or type(exc).__name__})
            continue
        idx, prob = topk(ensemble.predict(crops), top)
        results.append({"path": path, "top": [
            {"index": int(i), "wnid": ensemble.classes[i]["wnid"],
             "name": ensemble.classes[i]["name"], "prob": float(p)}
            for i, p in zip(idx[0], prob[0], strict=True)]})
    for r in results:
        r["models"] = [{"uri": m.uri, "name": m.name, "version": m.version} for m in refs]
    return results


def format_predictions(results: list[dict], out=sys.stdout) -> None:
    for r in results:
        print(r["path"], file=out)
        if "error" in r:
            print(f"  error: {r['error']}", file=out)
            continue
        for rank, t in enumerate(r["top"], 1):
            print(f"  {rank}  {t['prob']:.4f}  {t['index']:>4}  {t['wnid']:<10} {t['name']}",
                  file=out)
