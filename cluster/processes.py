"""Processes of the local stack (cluster/local.py): each service leads a session of its own,
and is stopped as that session, never by process name.

Every process is started with `start_new_session=True`, so it leads its own session;
stopping sends SIGTERM to that session's processes (Ray's `--block` handler then stops its
children gracefully), waits, and SIGKILLs what is left. Raylet workers stay in the session,
so nothing started here outlives `down`. psutil lists the processes and their state; the
session id comes from os.getsid (psutil does not expose it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent


class ClusterError(RuntimeError):
    """The stack cannot start or stop; the message says why and what to do."""


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every process started here.

    - PATH starts with this interpreter's bin: the job entrypoint (`python workflow.py ...`)
      runs in the raylet's environment, so `python` there is this venv's python.
    - RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM a Ray node would otherwise wait up to
      30 s to drain; `down` stops the whole cluster, so there is nothing to drain to.
    - RAY_AUTH_MODE=token: the cluster requires Ray's auth token (see `use_token_auth`).
    """
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    env["RAY_AUTH_MODE"] = "token"  # explicit, whatever this Ray version's default is
    env.pop("RAY_ADDRESS", None)  # `ray start --head` must not attach to another cluster
    env.update(extra or {})
    return env


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start `cmd` as the leader of a new session, output to `log`; returns its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env or child_env(),
                                start_new_session=True)
    return proc.pid


def _running(proc: psutil.Process) -> bool:
    """Live and not a zombie (exited, waiting for its parent to reap it)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _session(sid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and _running(proc):
                members.append(proc)
        except OSError:  # gone since the listing
            continue
    return members


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid`. While any exists, Linux does not reuse `sid` as a pid,
    so these are the processes the leader started (or their children)."""
    return [proc.pid for proc in _session(sid)]


def alive(pid: int) -> bool:
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def stop_session(pid: int, marker: str, timeout: float = 15.0) -> list[int]:
    """Stop the session led by `pid` (SIGTERM, then SIGKILL after `timeout`).

    `marker` must appear in the leader's command line: a leader pid that now belongs to
    another program (pid reuse after a reboot) is left alone. Returns the pids signalled."""
    if alive(pid) and marker not in _cmdline(pid):
        return []
    members = session_members(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in _session(pid):
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 10)
        while _session(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _session(pid):
            break
    _reap(pid)
    return members


def _reap(pid: int) -> None:
    """Collect the exit status when the leader is our own child (tests), else nothing."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def kill_raylet(node: dict) -> int:
    """SIGKILL the raylet of `node`: to the cluster this is a lost node (its workers die
    with it and `ray start --block` stops the rest). Returns the raylet's pid."""
    for proc in _session(node["pid"]):
        try:
            if proc.name() == "raylet":
                proc.kill()
                return proc.pid
        except psutil.NoSuchProcess:
            continue
    raise ClusterError(f"no raylet in the session of pid {node['pid']}: node not running")


def tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(what: str, ready: Callable[[], bool], pid: int, log: Path,
               timeout: float) -> None:
    """Poll `ready` until it holds; ClusterError with the log's tail when the process exits
    first, or when `timeout` passes (the session is stopped then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not alive(pid):
            raise ClusterError(f"{what} exited while starting; last lines of {log}:\n"
                               f"{tail(log)}")
        time.sleep(0.5)
    stop_session(pid, marker="")
    raise ClusterError(f"{what} not ready after {timeout:.0f} s (stopped it); last lines "
                       f"of {log}:\n{tail(log)}")
