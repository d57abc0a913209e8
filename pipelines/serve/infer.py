"""Batch inference with one registered model (or an ensemble) on Ray Data.

    python workflow.py batch-infer --model models:/alexnet@champion --input data/sample/val \
        --output predictions.parquet
    python workflow.py batch-infer --model models:/alexnet/1 --model models:/alexnet/2 \
        --input /shared/imagenet-shards --split val --ten-crop --actors 4 --gpu \
        --output /shared/preds/ --log-to-mlflow

Stages: list the inputs (a folder tree, a preprocess OUT's shards, an images-list file or a
Parquet/CSV table with a path column) -> map_batches(load_crops) in tasks (read, decode, the
model's own rescale and crop) -> map_batches(Predictor) on an actor pool (each actor loads the
weights once, from the object store, so actors on other nodes need no shared model path) ->
Parquet or CSV. Ray Data streams with backpressure, so memory stays flat on any input size.
A file that does not decode becomes a row with `error` set and no prediction.

Output: `--output NAME.parquet` or `NAME.csv` is one file, streamed through the driver (for a
folder or a few hundred thousand images); any other `--output` is a directory of files written
in parallel by the Ray workers (`ds.write_parquet` / `ds.write_csv`), for large inputs and
shared or remote storage. The summary (counts, top-1/top-5 accuracy, per class) is the same
either way; `--log-to-mlflow` records it as an evaluation run linked to the model version.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from pipelines.config import InferConfig
from pipelines.runtime import init_ray, stop_local_ray
from pipelines.serve.actor import DECODED_IMAGE_BYTES, Predictor, load_crops, model_source
from pipelines.serve.bundle import geometry, read_info
from pipelines.serve.inputs import list_inputs
from pipelines.serve.output import (
    Summary,
    check_output,
    output_plan,
    per_class_csv,
    write_dir,
    write_file,
)
from pipelines.serve.predict import DEFAULT_MODEL, InferError, ModelRef, resolve_models


# --------------------------------------------------------------------------- MLflow
def log_evaluation(cfg: InferConfig, refs: list[ModelRef], result: dict,
                   per_class: list[dict], source: dict) -> str:
    """An evaluation run: tags naming the model version(s) and training run(s), metrics
    (accuracy linked to the model in MLflow 3's model view), the per-class accuracy table
    and the summary as artifacts. Returns the run id."""
    import mlflow

    from pipelines import config
    from pipelines.train.tracking import setup_mlflow

    setup_mlflow()
    mlflow.set_experiment(cfg.experiment)

    def joined(attr: str) -> str:
        return ",".join(str(getattr(r, attr) or "") for r in refs)

    label = " + ".join(f"{r.name}/{r.version}" if r.version else r.uri for r in refs)
    tags = {"evaluation": "batch-infer", "model.uri": joined("uri"),
            "model.name": joined("name"), "model.version": joined("version"),
            "model.run_id": joined("run_id"), "input": cfg.input, "input.kind": source["kind"],
            "ten_crop": str(cfg.ten_crop), "ensemble_size": str(len(refs))}
    if "manifest_sha256" in source:
        tags["dataset.manifest_sha256"] = source["manifest_sha256"]
    metrics = {k: float(result[k]) for k in ("images", "errors", "labelled", "images_per_s")}
    for k in ("top1_accuracy", "top5_accuracy"):
        if k in result:
            metrics[k] = result[k]
            metrics[k.replace("accuracy", "error")] = 1.0 - result[k]
    # Linking metrics to the LoggedModel puts them on the model's page; an ensemble's numbers
    # belong to no single model, so they stay on the run (the tags still name every member).
    model_id = refs[0].model_id if len(refs) == 1 else None
    with mlflow.start_run(run_name=f"eval {label}") as run:
        mlflow.set_tags(tags)
        mlflow.log_params({k: str(v)[:500] for k, v in config.flatten(cfg).items()})
        mlflow.log_metrics(metrics, model_id=model_id)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "per_class_accuracy.csv").write_text(per_class_csv(per_class))
            (Path(tmp) / "summary.json").write_text(json.dumps(result, indent=1, default=str))
            mlflow.log_artifacts(tmp)
        return run.info.run_id


# --------------------------------------------------------------------------- the job
def _check_resources(cfg: InferConfig, ray) -> None:
    res = ray.cluster_resources()
    if cfg.gpu and res.get("GPU", 0) < 1:
        raise InferError("--gpu: the Ray cluster has no GPU (ray.cluster_resources() lists "
                         "none); drop --gpu or connect to a cluster with GPUs (RAY_ADDRESS)")
    need = max(cfg.actors, cfg.max_actors) * cfg.cpus_per_actor
    if need + 1 > res.get("CPU", 0):
        raise InferError(f"{max(cfg.actors, cfg.max_actors)} actors x {cfg.cpus_per_actor} CPUs "
                         f"leave no CPU for decoding on a cluster of {res.get('CPU', 0):g} CPUs; "
                         "lower --actors/--max-actors or --cpus-per-actor")


def _check_config(cfg: InferConfig) -> None:
    if not cfg.input:
        raise InferError("--input is required: a folder of images, a preprocess OUT, an "
                         "images-list file or a .parquet/.csv file with a path column")
    if "://" not in cfg.input and not Path(cfg.input).exists():
        raise InferError(f"input {cfg.input} does not exist (expected a folder of images, a "
                         "preprocess OUT, an images-list file or a .parquet/.csv file)")
    if cfg.batch_size < 1:
        raise InferError("--batch-size must be at least 1")
    for name in ("actors", "max_actors", "cpus_per_actor"):
        if getattr(cfg, name) < 0:
            raise InferError(f"--{name.replace('_', '-')} must be 0 (automatic) or more")
    if cfg.max_actors and cfg.max_actors < cfg.actors:
        raise InferError("--max-actors must be 0 (a fixed pool of --actors) or >= --actors")

# Auto layout on a local Ray, at most this many actors: each holds its own copy of the model
# (~240 MB of weights, ~475 MB PSS measured), and beyond a few actors more threads per actor
# cost less memory for the same cores.
MAX_AUTO_ACTORS = 4


def local_ray_cpus() -> int:
    """Logical CPUs of the local Ray batch-infer starts itself: the cores plus one. The model
    actors get every core and one decode task at a time runs beside them. Decoding costs a
    tenth of the model's CPU per image (2.2 against ~20 ms on one thread, measured), so a
    whole core of its own would leave most of that core idle (2-core machine, end to end
    against the bare loop: 1 actor x 1 thread 0.60-0.63x, 2 actors x 1 thread beside the
    decode tasks 0.88-0.92x, median 0.92x of five runs; benchmarks/batch_infer.py)."""
    return (os.cpu_count() or 1) + 1


def actor_layout(cfg: InferConfig, local: bool, gpus: float,
                 images: int | None = None) -> InferConfig:
    """cfg with --actors/--cpus-per-actor of 0 (automatic) made concrete. On the local Ray
    batch-infer started (`local`): one actor a core, at most MAX_AUTO_ACTORS, the cores
    shared out as their threads; with --gpu, one actor a GPU and a thread each. On a cluster
    nothing is known of the nodes' sizes here: 1 actor of 1 CPU, unless flags say more.
    Never more automatic actors than `images` make batches: an actor with no batch to run
    would only load the model (and hold its threads from the one that works)."""
    cores = os.cpu_count() or 1
    actors = cfg.actors or (max(1, int(gpus)) if cfg.gpu and local
                            else min(MAX_AUTO_ACTORS, cores) if local else 1)
    if not cfg.actors and images is not None:
        actors = max(1, min(actors, -(-images // cfg.batch_size)))
    if cfg.max_actors:
        actors = min(actors, cfg.max_actors)
    threads = cfg.cpus_per_actor or (max(1, cores // actors) if local and not cfg.gpu else 1)
    return dataclasses.replace(cfg, actors=actors, cpus_per_actor=threads)


def run_batch_infer(cfg: InferConfig) -> dict:
    """Run inference; writes cfg.output and returns counts, accuracy and where things went."""
    import ray

    started = time.time()
    _check_config(cfg)
    mode, fmt = output_plan(cfg)
    check_output(cfg, mode)
    refs_given = [cfg.model] if isinstance(cfg.model, str) else list(cfg.model or [DEFAULT_MODEL])
    # Downloaded models live in `tmp` until the job ends: actors on this node read them there.
    with tempfile.TemporaryDirectory(prefix="alexnet-infer-") as tmp:
        refs = resolve_models(refs_given, tmp)
        infos = [read_info(r.bundle) for r in refs]
        classes = infos[0]["classes"]
        geometries = sorted({geometry(i) for i in infos})
        inputs, source = list_inputs(cfg.input, cfg.split, classes, cfg.path_column,
                                     cfg.label_column)

        t = time.time()
        local = init_ray(lean=True, local_cpus=local_ray_cpus(), log_to_driver=False)
        ray_start_s = time.time() - t
        cfg = actor_layout(cfg, local, ray.cluster_resources().get("GPU", 0), inputs.num_rows)
        _check_resources(cfg, ray)
        ship = len([n for n in ray.nodes() if n.get("Alive")]) > 1
        sources = [model_source(r, ship) for r in refs]
        model_uri = " + ".join(r.uri for r in refs)
        versions = [r.version for r in refs]
        model_version = " + ".join(v or "" for v in versions) if any(versions) else None

        # from_blocks: block metadata computed here; from_arrow runs one remote task per block
        # for it (32 tasks and ~2 s before the first decode for 2,000 images on 2 CPUs).
        block = cfg.batch_size
        ds = ray.data.from_blocks([inputs.slice(offset, block)
                                   for offset in range(0, inputs.num_rows, block)])
        # Decoding stays in tasks, apart from the model actors: Ray Data fuses the two
        # (decode inside the actors) when their resource requests match, and then decoding
        # could not use CPUs beyond the actors'. The decode tasks' memory request (a real
        # estimate: a decoded photo and its crops, with headroom, per image) makes them differ.
        crop_bytes = sum(3 * s * s for _, s in geometries) * (10 if cfg.ten_crop else 1)
        ds = ds.map_batches(load_crops, batch_size=cfg.batch_size, batch_format="numpy",
                            fn_kwargs={"geometries": geometries, "ten_crop": cfg.ten_crop,
                                       "label_map": source.get("label_map")},
                            memory=cfg.batch_size * (crop_bytes + DECODED_IMAGE_BYTES))
        pool = (ray.data.ActorPoolStrategy(min_size=cfg.actors, max_size=cfg.max_actors)
                if cfg.max_actors > cfg.actors else ray.data.ActorPoolStrategy(size=cfg.actors))
        ds = ds.map_batches(Predictor, batch_size=cfg.batch_size, batch_format="numpy",
                            fn_constructor_kwargs={
                                "sources": sources, "model_uri": model_uri,
                                "model_version": model_version, "gpu": cfg.gpu,
                                "amp": cfg.amp, "threads": cfg.cpus_per_actor},
                            compute=pool, num_cpus=cfg.cpus_per_actor,
                            num_gpus=1 if cfg.gpu else 0)
        summary = Summary(classes)
        if mode == "file":
            write_file(ds, Path(cfg.output), fmt, summary)
        else:
            write_dir(ds, cfg.output, fmt, cfg.overwrite, summary)
    stop_local_ray(local)
    seconds = time.time() - started
    result = {"output": cfg.output, "output_mode": mode, "format": fmt, **summary.result(),
              "seconds": round(seconds, 2), "images_per_s": round(summary.images / seconds, 2),
              "model": model_uri, "model_version": model_version, "input_kind": source["kind"],
              "actors": cfg.actors, "cpus_per_actor": cfg.cpus_per_actor,
              "ray_start_s": round(ray_start_s, 2)}
    if "label_note" in source:
        result["label_note"] = source["label_note"]
    result["per_class"] = summary.per_class_rows()
    if cfg.log_to_mlflow:
        result.update(_log_evaluation_or_keep(cfg, refs, result, source))
    return result


def _log_evaluation_or_keep(cfg: InferConfig, refs: list[ModelRef], result: dict,
                            source: dict) -> dict:
    """Log the evaluation run; when MLflow cannot take it, the predictions are written all
    the same: keep the summary beside them (to log later) and return a warning instead of
    failing a job whose work is done."""
    from pipelines.train.journal import short_requests

    summary = {k: v for k, v in result.items() if k != "per_class"}
    try:
        with short_requests():  # a small run: minutes of retries would help no one
            return {"mlflow_run_id": log_evaluation(cfg, refs, summary, result["per_class"],
                                                    source)}
    except Exception as exc:  # noqa: BLE001 - tracking is a side channel of a finished job
        out = Path(cfg.output)
        kept = out / "summary.json" if out.is_dir() else out.with_name(out.name +
                                                                        ".summary.json")
        kept.write_text(json.dumps({**summary, "per_class": result["per_class"]}, indent=1,
                                   default=str))
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return {"mlflow_warning": f"the evaluation run could not be logged to MLflow "
                                  f"({first}); predictions are in {cfg.output} and the "
                                  f"summary in {kept}, to log later"}
