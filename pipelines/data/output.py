"""The preprocess output directory OUT: its lock, the parameters check against an earlier run,
atomic writes, disk-full and read-only errors, and the shared-storage probe of a cluster.

Used by `python workflow.py preprocess` (pipelines/data/preprocess.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

from pipelines.config import PreprocessConfig
from pipelines.files import atomic_write

LOW_DISK_BYTES = 64 << 20  # under this much free space, a failed write means a full disk


class PreprocessError(RuntimeError):
    """The whole job cannot proceed; the message says what to do."""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

# --------------------------------------------------------------------------- planning


def check_params(out: Path, params: dict, overwrite: bool) -> None:
    recorded = out / "preprocess.json"
    if recorded.exists():
        old = json.loads(recorded.read_text())
        if old != params:
            if not overwrite:
                diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
                raise PreprocessError(
                    f"{out} was made with other parameters {diff} (old, new). Use another "
                    f"--out, or --overwrite to replace it.")
            clear_out(out)
    atomic_write(recorded, json.dumps(params, indent=1, sort_keys=True))


def resume_command(out: str | os.PathLike) -> str | None:
    """The preprocess command that made (or began) OUT, from its preprocess.json: running
    it again finishes an interrupted OUT. None when OUT holds no preprocess.json."""
    try:
        params = json.loads((Path(out) / "preprocess.json").read_text())
    except (OSError, ValueError):
        return None
    parts = ["python workflow.py preprocess", f"--source {params.get('source')}", f"--out {out}"]
    defaults = PreprocessConfig()
    for key, value in sorted(params.items()):
        if key == "source" or not hasattr(defaults, key):
            continue
        flag = "--" + key.replace("_", "-")
        if key == "layout":  # the layout found, so auto is not asked to find it again
            parts.append(f"{flag} {value}")
        elif isinstance(value, bool):
            if value != getattr(defaults, key):
                parts.append(flag if value else f"--no-{flag[2:]}")
        elif value != getattr(defaults, key):
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)


def clear_out(out: Path) -> None:
    for child in out.iterdir():
        if child.name != ".lock":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def lock_out(out: Path):
    """Create OUT and take its lock; PreprocessError when OUT is not writable or busy."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "w")  # noqa: SIM115 - held for the whole run
        probe = out / f".probe.{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise PreprocessError(f"output {out} is not writable ({exc.strerror or exc}); choose "
                              "another --out or fix its permissions") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise PreprocessError(f"another preprocess is writing to {out} now; wait for it to "
                              "finish or use another --out") from None
    return lock


def output_problem(exc: BaseException, out: Path) -> str | None:
    """A message for failures of the whole output (disk full, read-only) hidden anywhere in a
    Ray task error's chain; None for anything else (a bug, which should show its traceback)."""
    seen, chain, text = set(), [exc], []
    while chain:
        e = chain.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        text.append(str(e))
        if isinstance(e, OSError) and e.errno is not None:
            text.append(os.strerror(e.errno))
        chain += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    blob = "\n".join(text)
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        free = 0
    # LMDB reports a failed write at commit as "Input/output error" even when the cause was a
    # full disk, so an I/O error next to (almost) no free space is called what it is.
    io_error = "Input/output error" in blob or "mdb_" in blob
    if ("No space left on device" in blob or "Disk quota" in blob
            or (io_error and free < LOW_DISK_BYTES)):
        return (f"out of disk space writing {out} ({free / 1e6:.1f} MB free). Free some space "
                "or use another --out, then run the same command again: finished shards are "
                "kept.")
    if "Read-only file system" in blob:
        return f"output {out} is on a read-only file system; use another --out"
    if io_error:
        return (f"I/O error writing {out}: check the disk, then run the same command again "
                "(finished shards are kept)")
    return None


def check_shared_storage(out: Path) -> None:
    """On a cluster, every node writes its pieces into OUT: refuse, before any work, an OUT
    that some node cannot see (a local path on the head node rather than shared storage)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    if len(nodes) < 2:
        return
    probe = out / f".shared-probe-{os.getpid()}"
    probe.write_text("x")
    try:
        sees = ray.get([ray.remote(num_cpus=0)(os.path.exists).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                str(probe)) for node in nodes])
    finally:
        probe.unlink(missing_ok=True)
    blind = [node[:12] for node, ok in zip(nodes, sees, strict=True) if not ok]
    if blind:
        raise PreprocessError(f"--out {out} is not visible from Ray node(s) {blind}: on a "
                              "cluster OUT must be on storage every node mounts at the same "
                              "path (NFS, a shared volume)")
