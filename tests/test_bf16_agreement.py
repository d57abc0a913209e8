"""benchmarks/bf16_agreement.py runs end to end on a tiny bundle and real JPEGs."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import REPO

from pipelines.precision import cpu_has_native_bf16
from pipelines.serve.model import save_bundle


def test_bf16_agreement_script_on_a_tiny_checkpoint(tmp_path):
    from alexnet import build_model
    from pipelines.data.sample import make_sample

    src = tmp_path / "src"
    make_sample(src, classes=3, train_per_class=4, val_per_class=2, seed=1,
                min_side=40, max_side=64)
    wnids = sorted(p.name for p in (src / "train").iterdir())
    classes = [{"index": i, "wnid": w, "name": w} for i, w in enumerate(wnids)]
    torch.manual_seed(0)
    info = {"variant": "cifar", "groups": 1, "num_classes": 3, "input_size": 32, "resize": 40,
            "mean": [128.0, 126.0, 124.0], "std": [60.0, 58.0, 62.0], "classes": classes}
    bundle = save_bundle(tmp_path / "bundle", build_model("cifar", 3).state_dict(), info)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bf16_agreement.py"),
                           "--model", str(bundle), "--images", str(src), "--batch-size", "4",
                           "--threads", "1"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if cpu_has_native_bf16():
        assert "18 images under" in proc.stdout  # 3 x (4 train + 2 val)
        assert "top-1 agreement bf16 vs fp32:" in proc.stdout
        # train: the wnid folders; val: LOC_val_solution.csv
        assert "top-1 accuracy on 18 labelled images" in proc.stdout
        assert "images/s (model calls only): fp32" in proc.stdout
    else:
        assert "no native bf16" in proc.stdout
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bf16_agreement.py"),
                          "--model", str(tmp_path / "nope"), "--images", str(src)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
