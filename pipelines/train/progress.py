"""One line per epoch while `train` runs: what a person watching the terminal needs.

    epoch 3/12  train loss 2.1010 err 0.812  val err 0.750 top-5 0.310  lr 0.0025
        85 img/s  data wait 4%  9.8 s  ETA 1m28s

(on one line). Printed by a Ray Train `UserCallback`, which runs on the Train controller
after every worker has reported the epoch: the metrics are rank 0's, already all-reduced
over the workers (train_loop), so the line speaks for the whole run. The controller's
stdout reaches the driver's terminal with Ray's `(TrainController pid=...)` prefix.
"""

from __future__ import annotations

import time

from ray.train import UserCallback


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def epoch_line(metrics: dict, epochs: int, seconds: float, eta: float | None) -> str:
    """The epoch's line from the metrics train_loop reports (val ones absent without a val
    split). `seconds`: the epoch's wall time, validation and checkpoint included."""
    parts = [f"epoch {int(metrics['epoch']) + 1}/{epochs}",
             f"train loss {metrics['train_loss']:.4f} err {metrics['train_top1_error']:.3f}"]
    if "val_top1_error" in metrics:
        parts.append(f"val err {metrics['val_top1_error']:.3f} "
                     f"top-5 {metrics['val_top5_error']:.3f}")
    parts += [f"lr {metrics['lr']:.3g}", f"{metrics['images_per_s']:.0f} img/s",
              f"data wait {100 * metrics['data_wait_fraction']:.0f}%", f"{seconds:.1f} s"]
    if eta is not None:
        parts.append(f"ETA {_duration(eta)}")
    return "  ".join(parts)


class EpochProgress(UserCallback):
    """Prints `epoch_line` after each reported epoch; the ETA assumes the remaining epochs
    take as long as the mean of those seen by this process (a restart starts the mean
    afresh). Early stopping can end the run before the ETA says."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.last: float | None = None
        self.durations: list[float] = []

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        now = time.time()
        if not metrics or "epoch" not in metrics[0]:
            return
        m = metrics[0]
        # The first epoch after a (re)start has no previous report: its own train time.
        seconds = now - self.last if self.last is not None else float(m.get("epoch_seconds", 0))
        self.last = now
        self.durations.append(seconds)
        left = self.epochs - (int(m["epoch"]) + 1)
        eta = sum(self.durations) / len(self.durations) * left if left > 0 else None
        print(epoch_line(m, self.epochs, seconds, eta), flush=True)


def _error(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_table(summary: dict) -> str:
    """The end of `train` (and `register --run`) for a person: what was trained, how well,
    where it is kept and what the registry made of it. `--json` prints the dict instead."""
    run = summary.get("run_name", "")
    head = f"run {run} finished"
    if "epochs_run" in summary:
        head += f": {summary['epochs_run']} of {summary['epochs']} epochs"
    if summary.get("stopped_early"):
        head += f" (stopped early: {summary['stopped_early']})"
    rows = [("best epoch", str(summary["best_epoch"] + 1)),
            ("val error", f"top-1 {_error(summary.get('val_top1_error'))}  "
                          f"top-5 {_error(summary.get('val_top5_error'))}"),
            ("checkpoint", summary["checkpoint"]),
            ("MLflow run", f"{summary['run_id']} at {summary['tracking_uri']}")]
    reg = summary.get("registered")
    if reg:
        alias = reg.get("alias") or "none"
        line = f"{reg['model_uri']}  alias {alias}"
        if reg.get("already_registered"):
            line += "  (registered before)"
        elif alias == "champion" and reg.get("previous") is not None:
            line += f" (was version {reg['previous']})"
        elif alias == "challenger" and reg.get("champion") is not None:
            why = f": {reg['reason']}" if reg.get("reason") else ""
            line += f" (champion stays version {reg['champion']}{why})"
        rows.append(("registered", line))
    elif "registered" in summary or summary.get("register") is False:
        rows.append(("registered", "no (--no-register)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([head, *(f"  {k:<{width}}  {v}" for k, v in rows)])
