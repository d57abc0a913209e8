"""Training metrics that never wait on MLflow: a durable journal plus a background sender.

Rank 0 writes each epoch's metrics first to `STORAGE/NAME/metrics_journal.jsonl` (through
the run's pyarrow filesystem, so it lives beside the checkpoints, on shared storage or S3,
and survives a worker restart or `--resume`), then a `MetricSender` thread sends what MLflow
lacks, with short HTTP timeouts and bounded retries. The step loop never calls MLflow.

Exactly once: a journal record is `(key, step, metrics)`; before sending, the sender asks
MLflow which steps of the record's marker metric it already has (again after every failure,
since a request that timed out may still have landed), so an outage back-fills each epoch
once and a restart never doubles one. The end of `train`, and `workflow.py register --run`
when the server was down at the end, drain the journal the same way (`drain`).

    python workflow.py train ...                  # writes and sends it
    python workflow.py register --run STORAGE/NAME   # sends what is left, then registers
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time

JOURNAL = "metrics_journal.jsonl"
# What a worker's MLflow client may spend on one request: seconds per attempt and retries.
# MLflow's defaults (120 s, 7 retries with backoff 2) block for minutes per call.
SENDER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}

log = logging.getLogger(__name__)


def prefer_short_requests() -> None:
    """SENDER_HTTP_ENV for this process, where the user has not set those variables."""
    for key, value in SENDER_HTTP_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def short_requests():
    """MLflow requests of SENDER_HTTP_ENV inside the block (unless the user set them), the
    previous settings after it: for calls that only probe or send a few numbers. Artifact
    uploads (a model's weights) keep MLflow's own, longer, timeouts."""
    saved = {k: os.environ.get(k) for k in SENDER_HTTP_ENV}
    prefer_short_requests()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class TrackingUnavailable(RuntimeError):
    """MLflow did not answer within the time the caller allowed."""


class MetricJournal:
    """Append-only record of what training logged, one JSON object a line, at `path` on
    pyarrow filesystem `fs`. Appends rewrite the (small: one line an epoch) file to a
    temporary name and move it into place, which also works on object stores."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self._records: list[dict] | None = None
        self._lock = threading.Lock()

    def records(self) -> list[dict]:
        with self._lock:
            return list(self._load())

    def _load(self) -> list[dict]:
        if self._records is None:
            import pyarrow.fs as pafs

            self._records = []
            if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
                with self.fs.open_input_stream(self.path) as fh:
                    text = fh.read().decode()
                for line in text.splitlines():
                    if line.strip():
                        try:
                            self._records.append(json.loads(line))
                        except ValueError:  # a torn last line of a crash: the rest stands
                            log.warning("%s: skipping an unreadable line", self.path)
        return self._records

    def append(self, key: str, step: int, metrics: dict[str, float]) -> bool:
        """Record `metrics` under (key, step) unless that pair is there already (a restarted
        epoch keeps the first record, the one MLflow may already have). True if added."""
        clean = {k: float(v) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))}
        with self._lock:
            records = self._load()
            if any(r["key"] == key and r["step"] == step for r in records):
                return False
            record = {"key": key, "step": int(step), "time_ms": int(time.time() * 1000),
                      "metrics": clean}
            text = "".join(json.dumps(r) + "\n" for r in [*records, record])
            tmp = f"{self.path}.tmp-{os.getpid()}"
            self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(tmp) as fh:
                fh.write(text.encode())
            self.fs.move(tmp, self.path)
            records.append(record)
            return True


def marker(record: dict) -> str:
    """The metric whose steps say whether MLflow has a record: its first metric's name."""
    return sorted(record["metrics"])[0] if record["metrics"] else record["key"]


def send_pending(client, run_id: str, records: list[dict]) -> int:
    """Send the records MLflow does not have yet; returns how many were sent. Raises what
    MLflow raises (the caller retries)."""
    from mlflow.entities import Metric

    have: dict[str, set[int]] = {}
    sent = 0
    for record in records:
        name = marker(record)
        if name not in have:
            have[name] = {m.step for m in client.get_metric_history(run_id, name)}
        if record["step"] in have[name] or not record["metrics"]:
            continue
        batch = [Metric(k, v, record["time_ms"], record["step"])
                 for k, v in record["metrics"].items()]
        client.log_batch(run_id, metrics=batch)
        have[name].add(record["step"])
        sent += 1
    return sent


def retry(fn, tracking_uri: str, deadline_s: float, sleep=time.sleep):
    """fn(), retried with backoff (2 s up to 30 s) while it fails, until `deadline_s` seconds
    have passed; then TrackingUnavailable with the last error."""
    start, wait = time.monotonic(), 2.0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any tracking failure is retried, then reported
            last = exc
        if time.monotonic() - start + wait > deadline_s:
            raise TrackingUnavailable(f"MLflow at {tracking_uri} did not answer for "
                                      f"{deadline_s:.0f} s ({_short(last)})")
        sleep(wait)
        wait = min(wait * 2, 30.0)


def drain(journal: MetricJournal, tracking_uri: str, run_id: str, deadline_s: float) -> int:
    """Send everything the journal holds that MLflow lacks (`retry` until `deadline_s`);
    returns the records sent."""
    from mlflow import MlflowClient

    return retry(lambda: send_pending(MlflowClient(tracking_uri), run_id, journal.records()),
                 tracking_uri, deadline_s)


def _short(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if exc is not None else "no answer"


class MetricSender(threading.Thread):
    """Sends the journal to MLflow in the background: after each `notify()` and every
    `interval` seconds, backing off up to 60 s while MLflow is down. Never raises into
    training; `close(timeout)` makes a last attempt and returns how many records are still
    unsent (they stay in the journal for the driver's `drain`)."""

    def __init__(self, journal: MetricJournal, tracking_uri: str, run_id: str,
                 interval: float = 5.0):
        super().__init__(name="mlflow-metric-sender", daemon=True)
        self.journal, self.tracking_uri, self.run_id = journal, tracking_uri, run_id
        self.interval = interval
        self._wake, self._stopping = threading.Event(), threading.Event()
        self.pending = 0
        self.down_since: float | None = None

    def notify(self) -> None:
        self._wake.set()

    def _attempt(self) -> bool:
        from mlflow import MlflowClient

        try:
            send_pending(MlflowClient(self.tracking_uri), self.run_id, self.journal.records())
        except Exception as exc:  # noqa: BLE001 - tracking is a side channel
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("MLflow at %s is not answering (%s); training goes on, metrics "
                            "are kept in %s and sent when it is back", self.tracking_uri,
                            _short(exc), self.journal.path)
            return False
        if self.down_since is not None:
            log.warning("MLflow at %s answers again after %.0f s; back-filled the journal",
                        self.tracking_uri, time.monotonic() - self.down_since)
            self.down_since = None
        return True

    def run(self) -> None:
        wait = self.interval
        while not self._stopping.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if self._stopping.is_set():
                break
            wait = self.interval if self._attempt() else min(max(wait, 2.0) * 2, 60.0)

    def close(self, timeout: float = 20.0) -> bool:
        """Stop the thread after one last attempt (at most `timeout` seconds); True when
        MLflow has everything."""
        self._stopping.set()
        self._wake.set()
        self.join(timeout)
        done = threading.Event()
        result = [False]

        def last():
            result[0] = self._attempt()
            done.set()

        threading.Thread(target=last, daemon=True).start()
        done.wait(timeout)
        return result[0]
