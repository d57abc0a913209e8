"""alexnet-workflow command line: parse, build a config, call one job.

    python workflow.py make-sample --out data/sample
    python workflow.py preprocess --source data/sample --out data/sample-shards
    python workflow.py verify --data data/sample-shards
    python workflow.py train --data data/sample-shards --workers 2 --epochs 2
    python workflow.py register --run checkpoints/alexnet   # when train exited with status 3
    python workflow.py batch-infer --model models:/alexnet@champion --input data/sample/val
    python workflow.py predict cat.jpg [--model models:/alexnet@champion]
    python workflow.py import-weights alexnet-owt-7be5be79.pth --variant torchvision \
        --classes LOC_synset_mapping.txt --alias champion
    python workflow.py export models:/alexnet@champion --format onnx --out alexnet.onnx
    python workflow.py info --variant paper --groups 2

Ray: the cluster at RAY_ADDRESS when set (as under `ray job submit`), else a local one.
MLflow: MLFLOW_TRACKING_URI when set, else sqlite:///mlflow.db in the working directory.
Errors about the input (missing data, bad flags) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines import config


def cmd_make_sample(args: argparse.Namespace) -> int:
    from pipelines.data.sample import make_sample

    summary = make_sample(args.out, classes=args.classes, train_per_class=args.train_per_class,
                          val_per_class=args.val_per_class, seed=args.seed)
    print(f"sample dataset: {summary['train']} train + {summary['val']} val images, "
          f"{summary['classes']} classes in {summary['root']}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from pipelines.data.manifest import summary_table
    from pipelines.data.preprocess import format_dry_run, run_preprocess

    cfg = config.load(config.PreprocessConfig, args)
    manifest = run_preprocess(cfg)
    if manifest.get("dry_run"):
        print(format_dry_run(manifest))
        return 0
    if manifest.get("already_complete"):
        from pipelines.data.verify import quick_check, repair_advice

        counts = ", ".join(f"{split} {s['records']} records in {len(s['shards'])} shards"
                           for split, s in manifest["splits"].items())
        problems = quick_check(cfg.out, manifest)
        if problems:
            print("\n".join(f"problem: {p}" for p in problems))
            print(f"{cfg.out} was complete ({counts}), but {len(problems)} shard(s) changed "
                  f"since; {repair_advice(cfg.out)}")
            return 1
        print(f"{cfg.out} is complete already, nothing to do: {counts}; every shard is there "
              f"with its size and record count (`python workflow.py verify --data {cfg.out}` "
              "reads every record)")
        return 0
    print(summary_table(manifest))
    print(f"manifest: {cfg.out}/manifest.json   quarantine: {cfg.out}/quarantine.jsonl")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipelines.data.shards import read_manifest
    from pipelines.data.verify import format_report, verify_output

    read_manifest(args.data)  # not a preprocess OUT at all: one line, exit 2 (not a report)
    report = verify_output(args.data, decode=args.decode)
    print(format_report(report))
    return 0 if report["ok"] else 1


def _given(args: argparse.Namespace) -> set[str]:
    """Config field names the user set: by a flag, or in the --config YAML (flat or under
    its section)."""
    import yaml

    given = {k for k, v in vars(args).items() if v is not None}
    if getattr(args, "config", None):
        values = yaml.safe_load(Path(args.config).read_text()) or {}
        for key, val in values.items() if isinstance(values, dict) else ():
            given |= set(val) if isinstance(val, dict) else {key}
    return given


def cmd_train(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from pipelines.train.launcher import apply_variant_defaults, run_train
    from pipelines.train.storage import stored_config

    stored = None
    if args.resume and not args.config:
        # --resume starts from the config the run was launched with; flags given now
        # (say --epochs 120) override it.
        base = config.load(config.TrainConfig, args)
        stored = stored_config(base.run.storage, base.run.name)
    if stored is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
            fh.write(stored)
        cfg = config.load(config.TrainConfig, args, yaml_path=fh.name)
        os.unlink(fh.name)
    else:
        cfg = config.load(config.TrainConfig, args)
        apply_variant_defaults(cfg, _given(args))
    summary = run_train(cfg)
    _print_summary(summary, args.json)
    return 0


def _print_summary(summary: dict, as_json: bool) -> None:
    from pipelines.train.progress import summary_table

    print(json.dumps(summary, indent=1, default=str) if as_json else summary_table(summary))


def cmd_register(args: argparse.Namespace) -> int:
    from pipelines.train.registry import run_register

    summary = run_register(args.run)
    _print_summary(summary, args.json)
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    from pipelines.train.pretrained import import_weights

    out = import_weights(args.file, args.variant, args.classes, args.name, args.alias,
                         args.experiment)
    alias = f" (alias {out['alias']})" if out["alias"] else ""
    print(f"imported {args.file} ({out['variant']}, {out['num_classes']} classes) as "
          f"{out['model_uri']}{alias}; MLflow run {out['run_id']} in experiment "
          f"{args.experiment!r}")
    return 0


def cmd_batch_infer(args: argparse.Namespace) -> int:
    from pipelines.serve.infer import run_batch_infer

    cfg = config.load(config.InferConfig, args)
    result = run_batch_infer(cfg)
    line = f"{result['images']} images -> {result['output']} ({result['errors']} errors"
    if "top1_accuracy" in result:
        line += (f"; top-1 accuracy {result['top1_accuracy']:.3f}, top-5 "
                 f"{result['top5_accuracy']:.3f} on {result['labelled']} labelled images")
    print(line + f"; {result['seconds']} s, {result['images_per_s']} images/s with "
          f"{result['actors']} model actor(s) x {result['cpus_per_actor']} CPU(s))")
    for e in result["error_examples"]:
        print(f"  error: {e['path']}: {e['error']}")
    if "label_note" in result:
        print(f"note: {result['label_note']}")
    if "mlflow_warning" in result:
        print(f"warning: {result['mlflow_warning']}", file=sys.stderr)
    if "mlflow_run_id" in result:
        print(f"evaluation run {result['mlflow_run_id']} (experiment {cfg.experiment!r})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipelines.serve.predict import format_predictions, predict_files

    if args.top < 1:  # [:0] printed nothing and [:-2] printed all but two of the classes
        raise ValueError(f"--top {args.top}: give the number of classes to print, at least 1")
    results = predict_files(args.images, args.model, ten_crop=args.ten_crop, top=args.top,
                            amp=args.amp)
    models = ", ".join(m["uri"] + (f" (version {m['version']})" if m["version"] else "")
                       for m in results[0]["models"])
    print(f"model: {models}")
    format_predictions(results)
    return 2 if any("error" in r for r in results) else 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipelines.serve.export import export_model

    s = export_model(args.ref, args.format, args.out, overwrite=args.overwrite)
    src = s["source"]
    version = f" (version {src['version']})" if src["version"] else ""
    print(f"model: {src['uri']}{version}, {s['variant']}, {s['num_classes']} classes")
    print(f"wrote {s['out']} ({s['format']}, {s['bytes'] / 1e6:.1f} MB; input NCHW float32 "
          f"RGB, output logits) and {s['sidecar']} (preprocessing and classes)")
    print(f"checked: its output equals PyTorch's to {s['max_abs_diff']:.2g} (max abs "
          "difference on 2 images)")
    return 0


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", default=None,
                   help="print the result as JSON (for scripts) instead of a table")


def _model_flag(p: argparse.ArgumentParser) -> None:
    # Repeatable: several --model flags make an ensemble whose softmax outputs are averaged.
    p.add_argument("--model", action="append", default=None, metavar="URI_OR_DIR",
                   help="models:/NAME@ALIAS (default models:/alexnet@champion), "
                        "models:/NAME/VERSION, models:/m-ID (a logged model), "
                        "runs:/RUN_ID/model or a local checkpoint dir; "
                        "give it several times for an ensemble (softmax averaged)")


def cmd_info(args: argparse.Namespace) -> int:
    from alexnet import INPUT_SIZE, build_model, check_variant
    from alexnet.summary import format_table, layer_table

    cfg = config.TrainConfig()  # `train`'s defaults and rule: groups 0 = 2 for paper, else 1
    cfg.model.variant, cfg.model.groups = args.variant, args.groups
    groups = config.resolve_auto(cfg).model.groups
    check_variant(args.variant, groups)
    model = build_model(args.variant, args.num_classes, groups=groups)
    size = INPUT_SIZE[args.variant]
    print(format_table(layer_table(model, (1, 3, size, size))))
    return 0


def _config_flags(p: argparse.ArgumentParser, cls: type, required: tuple[str, ...] = ()) -> None:
    """The config's flags. An empty default showed as "(default: )", so a required flag
    read as optional: required ones say so (they stay optional to argparse, since --config
    may give them), other empty defaults say nothing."""
    config.add_arguments(p, cls)
    for action in p._actions:
        if action.help and " (default: )" in action.help:
            action.help = action.help.replace(
                " (default: )", " (required)" if action.dest in required else "")


def build_parser() -> argparse.ArgumentParser:
    import dataclasses

    # `train`'s model flags, for the commands that take the same ones (`info`, `import-weights`).
    model_fields = {f.name: f for f in dataclasses.fields(config.ModelSection)}
    parser = argparse.ArgumentParser(prog="workflow.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-sample", help="write a small synthetic ImageNet-layout dataset")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--train-per-class", type=int, default=40, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=10, help="val images per class")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.set_defaults(func=cmd_make_sample)

    p = sub.add_parser("preprocess", help="decode, rescale and pack a dataset into LMDB shards")
    _config_flags(p, config.PreprocessConfig, ("source", "out"))
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("verify", help="check every shard and record of a preprocess OUT "
                       "(exit 0: whole, 1: problems found)")
    p.add_argument("--data", required=True, help="the preprocess OUT (holds manifest.json)")
    p.add_argument("--decode", action="store_true", help="also decode every image (slower)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("train", help="distributed training on Ray Train, tracked in MLflow")
    _config_flags(p, config.TrainConfig, ("data",))
    _json_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("register", help="finish a training run whose end could not reach "
                       "MLflow: send its metrics, log and register its best checkpoint")
    p.add_argument("--run", required=True, metavar="STORAGE/NAME",
                   help="the run's checkpoint directory, as `train` printed it")
    _json_flag(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("import-weights", help="register published AlexNet weights (a state "
                       "dict, e.g. torchvision's) as a servable MLflow model")
    p.add_argument("file", help="the .pth/.pt state dict (read with weights_only=True)")
    p.add_argument("--variant", required=True, choices=model_fields["variant"].metadata["choices"],
                   help="the layout the weights are in (torchvision's file: torchvision)")
    p.add_argument("--classes", required=True, metavar="MAPPING",
                   help="the class index the weights were trained with: `<wnid> <name>` a "
                        "line in index order, as ImageNet's LOC_synset_mapping.txt")
    p.add_argument("--name", default="", help="Model Registry name (default alexnet-VARIANT)")
    p.add_argument("--alias", default="", help="alias to give the new version, e.g. champion "
                   "(default none)")
    p.add_argument("--experiment", default="alexnet", help="MLflow experiment of the import "
                   "run (default alexnet)")
    p.set_defaults(func=cmd_import_weights)

    p = sub.add_parser("batch-infer", help="run a registered model over many images",
                       conflict_handler="resolve")
    _config_flags(p, config.InferConfig, ("input",))
    _model_flag(p)  # replaces the config's --model with a repeatable one
    p.set_defaults(func=cmd_batch_infer)

    p = sub.add_parser("predict", help="top-5 classes of a few images (no Ray)")
    p.add_argument("images", nargs="+", help="image files")
    _model_flag(p)
    p.add_argument("--ten-crop", action="store_true", help="average the ten crops' softmax")
    p.add_argument("--top", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast + channels_last where the CPU has native bf16 "
                        "(AVX512_BF16/AMX); fp32 elsewhere or with --no-amp (default on)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a model as ONNX or TorchScript, with its "
                       "preprocessing in FILE.json beside it")
    p.add_argument("ref", metavar="REF", help="models:/NAME@ALIAS, models:/NAME/VERSION, "
                   "runs:/RUN_ID/model or a local checkpoint dir")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"),
                   help="onnx (opset 18, dynamic batch) or torchscript (torch.jit.trace)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the model file to write; the sidecar is FILE.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace FILE and FILE.json when they exist")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="layer table of an AlexNet variant")
    # The same --variant/--groups as `train` (defaults and help from ModelSection).
    for flag in ("variant", "groups"):
        f = model_fields[flag]
        p.add_argument(f"--{flag}", type=type(f.default), default=f.default,
                       choices=f.metadata["choices"],
                       help=f"{f.metadata['help']} (default: {f.default})")
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(func=cmd_info)
    return parser


# Errors that mean "your input is wrong", shown as one line, not a traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from pipelines.data.output import PreprocessError
    from pipelines.data.sources import SourceError
    from pipelines.serve.export import ExportError
    from pipelines.serve.infer import InferError
    from pipelines.train.errors import TrainError

    return (ExportError, InferError, PreprocessError, SourceError, TrainError, FileNotFoundError,
            FileExistsError, ValueError)


def _yaml_error(exc: BaseException, args: argparse.Namespace) -> str:
    """PyYAML's own message spans five lines with a caret drawing; keep what and where."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = getattr(exc, "problem", None) or type(exc).__name__
    return (f"--config {getattr(args, 'config', '')}: not valid YAML ({what}{where}); "
            "it must be a mapping of config keys, e.g. `lr: 0.02`")


def _interrupted(args: argparse.Namespace, exc: KeyboardInterrupt) -> str:
    """What a Ctrl-C left behind, and how to go on."""
    if str(exc):  # train's TrainInterrupted names the run and its --resume command
        return str(exc)
    if args.command == "preprocess":
        out = getattr(args, "out", None) or "OUT"
        return (f"the shards finished in {out} are kept, and the images staged for the others; "
                "run the same command again to finish it")
    return "stopped"


def main(argv: list[str] | None = None) -> int:
    import yaml

    from pipelines.train.errors import TrackingPending

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrackingPending as exc:  # the work is done and safe; only tracking is behind
        print(f"tracking pending: {exc}", file=sys.stderr)
        return TrackingPending.exit_status
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:
        print(f"error: {_yaml_error(exc, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted: {_interrupted(args, exc)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
