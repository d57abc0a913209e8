"""What a command and every process it starts (Ray's GCS, raylet, workers, actors) use: peak
memory and CPU seconds, read with psutil while it runs. Shared by the benchmarks; not run on
its own (Linux only: PSS comes from /proc/PID/smaps_rollup).

Memory is the proportional set size (PSS): pages shared between processes, such as Ray's
object store or the libraries every worker maps, count once in the sum instead of once per
process, so the total is what the job really holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import psutil


def ray_kind(pid: int, title: str, root: int) -> str:
    """Which part of a Ray job a process is: the driver (root), Ray's workers (by the task or
    actor they run), or one of Ray's services (by its script)."""
    if pid == root:
        return "driver"
    if title.startswith("ray::"):  # ray::IDLE, ray::MapBatches(stage_batch), ray::_StatsActor
        name = title[5:].split("(")[0].split(".")[0].split(":")[-1].strip()
        # Ray's and Ray Data's own actors and agents apart; a worker's title changes with
        # each task or actor it runs (IDLE, MapBatches, MapWorker, finalize_shard, ...).
        return f"Ray {name}" if name.endswith(("Actor", "Agent")) else "Ray workers"
    words = title.split()
    script = next((w for w in words[1:] if w.endswith(".py")), words[0] if words else "?")
    return f"Ray {os.path.basename(script)}"


class TreeSampler:
    """Samples a process tree every `interval` s in a thread, until stopped: peak PSS of the
    whole tree and per kind of process, the root's peak RSS, and each process's last CPU
    seconds (a process's last fraction of an interval before it exits can be missed)."""

    def __init__(self, root: int, kind: Callable[[int, str, int], str] = ray_kind,
                 interval: float | None = None, memory: bool = True):
        # Reading PSS is not free: smaps_rollup walks every mapping of a process, and a Ray
        # job has ~15 processes mapping GBs (torch, the object store). Measured: every 0.2 s
        # it cost 9.7 CPU-s in a 38 s batch-infer run, 13 % of a 2-core machine, taken from
        # the job being timed. Speed runs read only the CPU times (cheap: /proc/PID/stat
        # under psutil), every 0.5 s; memory runs are separate.
        self.memory = memory
        self.root, self.kind = root, kind
        self.interval = interval or (0.2 if memory else 0.5)
        self.peak_pss_kb = 0
        self.peak_root_rss_kb = 0
        self.peak_pss_kb_by_kind: dict[str, int] = {}
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds)
        self._root = psutil.Process(root)
        self._known: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> list[psutil.Process]:
        """The root and its live descendants; a process keeps its Process object from one
        sample to the next (psutil then reads its start time once, and a reused pid is
        told apart from it)."""
        try:
            current = [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self._known = {proc.pid: self._known.get(proc.pid, proc) for proc in current}
        return list(self._known.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            pss_by_pid: dict[int, int] = {}
            for proc in self._tree():
                try:
                    times = proc.cpu_times()
                    pss_by_pid[proc.pid] = (proc.memory_full_info().pss >> 10
                                            if self.memory else 0)
                except psutil.Error:  # gone between the listing and the reading
                    continue
                try:
                    title = " ".join(proc.cmdline())
                except psutil.Error:  # exiting: a zombie has no command line left
                    title = ""
                seconds = times.user + times.system
                if seconds:  # an exiting process has no title left: keep the kind it had
                    kind = self.kind(proc.pid, title, self.root) if title.strip() else \
                        self.cpu.get(proc.pid, ("?",))[0]
                    self.cpu[proc.pid] = (kind, seconds)
            self.peak_pss_kb = max(self.peak_pss_kb, sum(pss_by_pid.values()))
            if self.memory:
                try:
                    rss_kb = self._root.memory_info().rss >> 10
                except psutil.Error:
                    rss_kb = 0
                self.peak_root_rss_kb = max(self.peak_root_rss_kb, rss_kb)
            pss_by_kind: dict[str, int] = {}
            for pid, kb in pss_by_pid.items():
                kind = self.cpu.get(pid, ("?",))[0]
                pss_by_kind[kind] = pss_by_kind.get(kind, 0) + kb
            for kind, kb in pss_by_kind.items():
                self.peak_pss_kb_by_kind[kind] = max(self.peak_pss_kb_by_kind.get(kind, 0), kb)
            self._stop.wait(self.interval)

    def cpu_s(self) -> float:
        return sum(seconds for _, seconds in self.cpu.values())

    def cpu_s_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, seconds in self.cpu.values():
            out[kind] = round(out.get(kind, 0.0) + seconds, 2)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def peak_pss_mb_by_kind(self) -> dict[str, int]:
        return {k: round(v / 1024) for k, v in sorted(self.peak_pss_kb_by_kind.items(),
                                                       key=lambda kv: -kv[1])}


def run_measured(cmd: list[str], env: dict | None = None, cwd: str | Path | None = None,
                 json_result: bool = True, memory: bool = True) -> tuple[dict | str, TreeSampler]:
    """Run cmd in its own session, sampled (`memory`: PSS too, which costs the run CPU; see
    TreeSampler); returns its last stdout line parsed as JSON (or its whole stdout when
    json_result is False) and the sampler. SystemExit with the tail of its output when it
    fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
                            cwd=cwd, start_new_session=True)
    with TreeSampler(proc.pid, memory=memory) as sampler:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} failed ({proc.returncode}):\n"
                         f"{(out + err)[-3000:]}")
    if not json_result:
        return out, sampler
    return json.loads(out.strip().splitlines()[-1]), sampler
