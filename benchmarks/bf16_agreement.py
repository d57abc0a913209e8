"""bf16 vs fp32 inference of one model: top-1 agreement and images/s.

    .venv/bin/python benchmarks/bf16_agreement.py --model checkpoints/alexnet/<ckpt dir>
    .venv/bin/python benchmarks/bf16_agreement.py --model models:/alexnet@champion \
        --images /work/shared/data/imagenet-sample --ten-crop

Every image under --images (default: the shared 200-image ImageNet sample) is predicted
twice through `pipelines.serve.predict.Ensemble`, the code `predict` and `batch-infer` run: with
`amp=False` (fp32, NCHW) and with `amp=True` (bf16 autocast + channels_last where the CPU has
native bf16, see pipelines/precision.py). Prints the top-1 agreement %, the largest
probability difference, top-1 accuracy of both where labels are known (the wnid folder an
image sits in, or LOC_val_solution.csv beside the images), and images/s of the model calls
alone (decode and crops are done once, before, and not timed; one warm-up batch each).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_IMAGES = next((str(p) for p in (Path("/work/shared/data/imagenet-sample"),
                                        REPO.parent / "shared" / "data" / "imagenet-sample")
                       if p.is_dir()), "")


def _labels(root: Path, paths: list[Path], wnids: dict[str, int]) -> list[int | None]:
    solution = {}
    csv_path = root / "LOC_val_solution.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as fh:
            solution = {r["ImageId"]: r["PredictionString"].split()[0]
                        for r in csv.DictReader(fh) if r.get("PredictionString")}
    out = []
    for p in paths:
        wnid = p.parent.name if p.parent.name in wnids else solution.get(p.stem)
        out.append(wnids.get(wnid) if wnid else None)
    return out


def _timed_predict(ensemble, crops, batch: int, threads: int):
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    ensemble.predict([crops[:batch]])  # warm-up: oneDNN builds its kernels for the shapes
    start = time.perf_counter()
    probs = np.concatenate([ensemble.predict([crops[i:i + batch]])
                            for i in range(0, len(crops), batch)])
    return probs, len(crops) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True,
                        help="a checkpoint / bundle dir, models:/NAME@ALIAS or runs:/ID/model")
    parser.add_argument("--images", default=DEFAULT_IMAGES,
                        help="folder of images, searched recursively (default: the shared "
                             "ImageNet sample)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ten-crop", action="store_true", help="the paper's ten crops")
    args = parser.parse_args(argv)

    import numpy as np

    from pipelines.data.decode import decode_rgb
    from pipelines.data.sources import IMAGE_EXTENSIONS
    from pipelines.precision import cpu_has_native_bf16
    from pipelines.serve.predict import Ensemble, InferError, resolve_models

    root = Path(args.images)
    if not args.images or not root.is_dir():
        print(f"error: --images {args.images!r} is not a folder", file=sys.stderr)
        return 2
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        print(f"error: no images under {root}", file=sys.stderr)
        return 2
    try:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="alexnet-bf16-") as tmp:
            bundles = [r.bundle for r in resolve_models([args.model], tmp)]
            fp32 = Ensemble(bundles, amp=False)
            bf16 = Ensemble(bundles, amp=True)
    except InferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if bf16.amp_dtype is None:
        print("this CPU has no native bf16 (or PyTorch's oneDNN has no bf16 kernels for it): "
              "--amp runs fp32 here; nothing to compare")
        return 0

    crops, kept = [], []
    for p in paths:
        try:
            crops.append(fp32.crops(decode_rgb(p.read_bytes()), args.ten_crop)[0])
            kept.append(p)
        except Exception as exc:  # noqa: BLE001 - a bad file is skipped and said
            print(f"skipped {p}: {exc}", file=sys.stderr)
    crops = np.stack(crops)
    wnids = {c["wnid"]: i for i, c in enumerate(fp32.classes)}
    labels = _labels(root, kept, wnids)

    p32, ips32 = _timed_predict(fp32, crops, args.batch_size, args.threads)
    p16, ips16 = _timed_predict(bf16, crops, args.batch_size, args.threads)
    top32, top16 = p32.argmax(1), p16.argmax(1)
    agree = float((top32 == top16).mean())
    print(f"{len(kept)} images under {root}, {'ten-crop' if args.ten_crop else 'centre crop'}, "
          f"batch {args.batch_size}, {args.threads} thread(s), model {args.model}")
    print(f"top-1 agreement bf16 vs fp32: {100 * agree:.2f} % "
          f"({int((top32 != top16).sum())} of {len(kept)} differ); "
          f"max |p_bf16 - p_fp32| {float(np.abs(p16 - p32).max()):.4f}")
    known = [i for i, lab in enumerate(labels) if lab is not None]
    if known:
        truth = np.array([labels[i] for i in known])
        print(f"top-1 accuracy on {len(known)} labelled images: fp32 "
              f"{100 * float((top32[known] == truth).mean()):.2f} %, bf16 "
              f"{100 * float((top16[known] == truth).mean()):.2f} %")
    print(f"images/s (model calls only): fp32 {ips32:.1f}, bf16 {ips16:.1f} "
          f"({ips16 / ips32:.2f}x); native bf16: {cpu_has_native_bf16()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
