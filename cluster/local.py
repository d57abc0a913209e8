"""A real local stack on one machine: a Ray head (+ extra raylets) and an MLflow tracking server.

    python -m cluster up                  # Ray head, dashboard http://127.0.0.1:8265
                                          # + MLflow server http://127.0.0.1:5000
    python -m cluster add-node --num-cpus 2   # a second raylet joins: a two-node cluster
    python -m cluster status
    python -m cluster kill-node           # SIGKILL the last added node's raylet (a node failure)
    python -m cluster down                # stops exactly what `up`/`add-node` started

Then, from the repository root (see README "From laptop to cluster"):

    export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python workflow.py train --data /abs/path/shards --storage /abs/path/checkpoints

Why process groups and not `ray stop`: `ray stop` kills every Ray process of the machine's user
(it matches process names), including clusters this stack did not start. Every process here is
started with `start_new_session=True` (`ray start --block`, `mlflow server`), so it leads its own
session; stopping sends SIGTERM to that session's processes (Ray's `--block` handler then stops
its children gracefully), waits, and SIGKILLs what is left. Raylet workers stay in the session,
so nothing started here outlives `down`.

Everything lives under one state directory (default `.cluster/`, ignored by git and by the job
upload): `state.json` (pids, ports, addresses), logs, `mlflow.db` (the sqlite backend store) and
`mlartifacts/` (the artifact store the server proxies). Ray's own temp dir is a short path under
/tmp (Unix socket paths are limited to 107 bytes), one per node, recorded in `state.json`.

Security: the dashboard and MLflow bind 127.0.0.1 unless `--host` says otherwise. Ray 2.5x+
clusters use token authentication by default (token in ~/.ray/auth_token; `ray job submit` and
the dashboard read it from there); nothing here prints or logs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_DIR = ".cluster"
STATE = "state.json"
BIN = Path(sys.executable).parent


class ClusterError(RuntimeError):
    """The stack cannot start or stop; the message says why and what to do."""


# --------------------------------------------------------------------------- processes
def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


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


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(comm, session id) of a live process, None when it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] == "Z":  # exited, waiting for its parent to reap it
        return None
    return comm, int(fields[3])  # fields: state ppid pgrp session ...


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid`. While any exists, Linux does not reuse `sid` as a pid,
    so these are the processes the leader started (or their children)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st and st[1] == sid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    return _proc_stat(pid) is not None


def stop_session(pid: int, marker: str, timeout: float = 15.0) -> list[int]:
    """Stop the session led by `pid` (SIGTERM, then SIGKILL after `timeout`).

    `marker` must appear in the leader's command line: a leader pid that now belongs to
    another program (pid reuse after a reboot) is left alone. Returns the pids signalled."""
    if alive(pid) and marker not in _cmdline(pid):
        return []
    members = session_members(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in session_members(pid):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 10)
        while session_members(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_members(pid):
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
    for p in session_members(node["pid"]):
        st = _proc_stat(p)
        if st and st[0] == "raylet":
            os.kill(p, signal.SIGKILL)
            return p
    raise ClusterError(f"no raylet in the session of pid {node['pid']}: node not running")


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(what: str, ready, pid: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not alive(pid):
            raise ClusterError(f"{what} exited while starting; last lines of {log}:\n"
                               f"{_tail(log)}")
        time.sleep(0.5)
    stop_session(pid, marker="")
    raise ClusterError(f"{what} not ready after {timeout:.0f} s (stopped it); last lines "
                       f"of {log}:\n{_tail(log)}")


# --------------------------------------------------------------------------- Ray
def use_token_auth() -> None:
    """Token authentication for the cluster and for this process's Ray clients.

    The token is Ray's own (~/.ray/auth_token, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH); one
    is generated there when none exists. It is never printed. Clients (JobSubmissionClient,
    the state API, `ray job submit`) send it only when RAY_AUTH_MODE=token in their process.
    """
    from ray._private.authentication import authentication_token_setup as tokens
    from ray._raylet import AuthenticationTokenLoader, Config

    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        tokens.generate_and_save_token()
    if os.environ.get("RAY_AUTH_MODE") != "token":
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray caches the mode; re-read it from the environment


def short_temp_dir(prefix: str) -> str:
    """A Ray temp dir: short, since Ray's socket paths under it must fit in 107 bytes."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def _ray_common(temp_dir: str, num_cpus: int | None, num_gpus: int | None,
                object_store_mb: int | None, resources: dict | None) -> list[str]:
    # The node name (the temp dir's name, unique) is how `wait_node` finds this node.
    cmd = ["--block", "--temp-dir", temp_dir, "--node-name", Path(temp_dir).name,
           "--disable-usage-stats",
           # The agent's default port (52365) is fixed: a second node on the same machine
           # (or anyone else's Ray) would collide, so each node gets a free one.
           "--dashboard-agent-listen-port", str(free_port())]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    if object_store_mb:
        cmd += ["--object-store-memory", str(object_store_mb * 2**20)]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    return cmd


def dashboard_ready(url: str) -> bool:
    """The Jobs API answers (JobSubmissionClient sends the cluster's auth token itself)."""
    from ray.job_submission import JobSubmissionClient

    use_token_auth()
    try:
        JobSubmissionClient(url).get_version()
        return True
    except Exception:  # not listening yet, or starting: retried by the caller
        return False


def alive_nodes(dashboard_url: str) -> list[dict]:
    """ALIVE nodes of the cluster, from the state API behind the dashboard."""
    from ray.util.state import list_nodes

    use_token_auth()
    nodes = list_nodes(address=dashboard_url, filters=[("state", "=", "ALIVE")],
                       raise_on_missing_output=False)
    return [{"node_id": n.node_id, "name": n.node_name, "ip": n.node_ip,
             "head": n.is_head_node, "resources": n.resources_total} for n in nodes]


def _node_alive(dashboard_url: str, name: str) -> bool:
    try:
        return any(n["name"] == name for n in alive_nodes(dashboard_url))
    except Exception:  # the state API is not up yet
        return False


def wait_nodes(dashboard_url: str, count: int, timeout: float = 120.0) -> list[dict]:
    """Wait until the cluster has exactly `count` ALIVE nodes (after a start, or after a
    node was lost: the head notices a dead raylet within its health-check period)."""
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    while time.monotonic() < deadline:
        try:
            nodes = alive_nodes(dashboard_url)
        except Exception:  # the state API is not up yet
            nodes = []
        if len(nodes) == count:
            return nodes
        time.sleep(1.0)
    raise ClusterError(f"expected {count} ALIVE Ray nodes, found {len(nodes)} after "
                       f"{timeout:.0f} s")


def start_head(state_dir: Path, *, port: int = 6379, dashboard_port: int = 8265,
               host: str = HOST, num_cpus: int | None = None, num_gpus: int | None = None,
               object_store_mb: int | None = None, resources: dict | None = None,
               env: dict[str, str] | None = None, timeout: float = 120.0) -> dict:
    """`ray start --head --block` with the dashboard on host:dashboard_port; waits until the
    Jobs API answers and the head node is ALIVE. `env`: extra environment (e.g. Ray system
    config such as RAY_health_check_period_ms). Returns the node record kept in state.json."""
    for p, what in ((port, "--ray-port"), (dashboard_port, "--dashboard-port")):
        if 10002 <= p <= 19999:  # Ray's default worker port range
            raise ClusterError(f"{what} {p} is inside Ray's worker port range 10002-19999")
        if port_in_use(p):
            raise ClusterError(f"port {p} is in use (another Ray or server?): pass a free "
                               f"{what}, e.g. {what} {free_port()}")
    use_token_auth()
    temp_dir = short_temp_dir("ray-head-")
    log = state_dir / "logs" / "ray-head.log"
    cmd = [str(BIN / "ray"), "start", "--head", "--port", str(port),
           "--dashboard-host", host, "--dashboard-port", str(dashboard_port),
           "--include-dashboard", "true",
           *_ray_common(temp_dir, num_cpus, num_gpus, object_store_mb, resources)]
    pid = spawn(cmd, log, child_env(env))
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{dashboard_port}"
    name = Path(temp_dir).name
    _wait("ray head", lambda: dashboard_ready(url) and _node_alive(url, name), pid, log,
          timeout)
    return {"role": "head", "pid": pid, "temp_dir": temp_dir, "name": name, "log": str(log),
            "gcs_address": f"127.0.0.1:{port}", "dashboard_url": url}


def start_worker(state_dir: Path, gcs_address: str, dashboard_url: str, *,
                 num_cpus: int | None = None, num_gpus: int | None = None,
                 object_store_mb: int | None = None, resources: dict | None = None,
                 env: dict[str, str] | None = None, timeout: float = 120.0) -> dict:
    """`ray start --address HEAD --block`: one more raylet (a node) joins the cluster;
    waits until the cluster lists it ALIVE."""
    use_token_auth()
    temp_dir = short_temp_dir("ray-node-")
    name = Path(temp_dir).name
    log = state_dir / "logs" / f"{name}.log"
    cmd = [str(BIN / "ray"), "start", "--address", gcs_address,
           *_ray_common(temp_dir, num_cpus, num_gpus, object_store_mb, resources)]
    pid = spawn(cmd, log, child_env(env))
    _wait(f"ray worker node {name}", lambda: _node_alive(dashboard_url, name), pid, log,
          timeout)
    return {"role": "worker", "pid": pid, "temp_dir": temp_dir, "name": name, "log": str(log)}


# --------------------------------------------------------------------------- MLflow
def mlflow_ready(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def start_mlflow(state_dir: Path, *, port: int = 5000, host: str = HOST, workers: int = 1,
                 allowed_hosts: str | None = None, timeout: float = 120.0) -> dict:
    """`mlflow server` with a sqlite backend store and proxied artifacts (`--serve-artifacts`):
    clients (Ray workers included) upload and download artifacts through the server, so
    they need no credentials for the artifact store; only the server does."""
    if port_in_use(port):
        raise ClusterError(f"port {port} is in use: pass a free --mlflow-port, e.g. "
                           f"--mlflow-port {free_port()}")
    state_dir.mkdir(parents=True, exist_ok=True)
    backend = f"sqlite:///{(state_dir / 'mlflow.db').resolve()}"
    artifacts = str((state_dir / "mlartifacts").resolve())
    log = state_dir / "logs" / "mlflow.log"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend,
           "--serve-artifacts", "--artifacts-destination", artifacts,
           "--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    pid = spawn(cmd, log)
    uri = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    _wait("mlflow server", lambda: mlflow_ready(uri), pid, log, timeout)
    return {"pid": pid, "uri": uri, "backend_store_uri": backend,
            "artifacts_destination": artifacts, "log": str(log)}


# --------------------------------------------------------------------------- state + CLI
def load_state(state_dir: Path) -> dict:
    path = state_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_state(state_dir: Path, state: dict) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    # Keeps git (and `ray job submit`, which reads .gitignore files) out of the state dir.
    ignore = state_dir / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    tmp = state_dir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, state_dir / STATE)


def stop_node(node: dict) -> list[int]:
    return stop_session(node["pid"], marker=node["temp_dir"])


def stop_all(state: dict) -> dict[str, tuple[int, float]]:
    """Stop worker nodes first (so the head does not log them as lost), then the head and
    MLflow. Returns (processes signalled, seconds) per component."""
    stopped: dict[str, tuple[int, float]] = {}

    def timed(name: str, fn, *args, **kwargs) -> None:
        t0 = time.monotonic()
        stopped[name] = (len(fn(*args, **kwargs)), round(time.monotonic() - t0, 1))

    for node in reversed(state.get("nodes", [])):
        if node["role"] == "worker":
            timed(node["name"], stop_node, node)
    for node in state.get("nodes", []):
        if node["role"] == "head":
            timed("head", stop_node, node)
    if state.get("mlflow"):
        m = state["mlflow"]
        timed("mlflow", stop_session, m["pid"], marker=m["artifacts_destination"])
    return stopped


def env_lines(state: dict) -> list[str]:
    """What a shell needs for `ray job submit` and the MLflow client; never the auth token
    (RAY_AUTH_MODE=token only tells Ray's clients to send the token they find)."""
    lines = []
    head = next((n for n in state.get("nodes", []) if n["role"] == "head"), None)
    if head:
        lines.append(f"export RAY_API_SERVER_ADDRESS={head['dashboard_url']} "
                     "RAY_AUTH_MODE=token")
    if state.get("mlflow"):
        lines.append(f"export MLFLOW_TRACKING_URI={state['mlflow']['uri']}")
    return lines


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = Path(args.dir).resolve()
    state = load_state(state_dir)
    if any(alive(n["pid"]) for n in state.get("nodes", [])):
        raise ClusterError(f"a stack from {state_dir} is running: `python -m cluster down "
                           f"--dir {args.dir}` first, or use another --dir")
    state = {"dir": str(state_dir), "nodes": []}
    try:
        if not args.no_mlflow:
            state["mlflow"] = start_mlflow(state_dir, port=args.mlflow_port, host=args.host,
                                           allowed_hosts=args.allowed_hosts)
            save_state(state_dir, state)
        head = start_head(state_dir, port=args.ray_port, dashboard_port=args.dashboard_port,
                          host=args.host, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                          object_store_mb=args.object_store_mb)
        state["nodes"].append(head)
        save_state(state_dir, state)
        for _ in range(args.extra_nodes):
            state["nodes"].append(start_worker(
                state_dir, head["gcs_address"], head["dashboard_url"],
                num_cpus=args.worker_cpus, num_gpus=args.worker_gpus,
                object_store_mb=args.object_store_mb))
            save_state(state_dir, state)
    except BaseException:
        stop_all(state)  # never leave half a stack behind
        save_state(state_dir, {"dir": str(state_dir), "nodes": []})
        raise
    _print_status(state)
    return 0


def cmd_add_node(args: argparse.Namespace) -> int:
    state_dir = Path(args.dir).resolve()
    state = load_state(state_dir)
    head = next((n for n in state.get("nodes", []) if n["role"] == "head"), None)
    if head is None or not alive(head["pid"]):
        raise ClusterError(f"no running head in {state_dir}: `python -m cluster up` first")
    node = start_worker(state_dir, head["gcs_address"], head["dashboard_url"],
                        num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                        object_store_mb=args.object_store_mb)
    state["nodes"].append(node)
    save_state(state_dir, state)
    _print_status(state)
    return 0


def cmd_kill_node(args: argparse.Namespace) -> int:
    state = load_state(Path(args.dir).resolve())
    workers = [n for n in state.get("nodes", []) if n["role"] == "worker" and alive(n["pid"])]
    if not workers:
        raise ClusterError("no running worker node to kill")
    print(f"killed raylet pid {kill_raylet(workers[-1])} (node started by pid "
          f"{workers[-1]['pid']})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = Path(args.dir).resolve()
    state = load_state(state_dir)
    if not state:
        print(f"nothing to stop: no {STATE} in {state_dir}")
        return 0
    stopped = stop_all(state)
    if not args.keep_ray_temp:  # Ray's session logs and sockets; our own logs stay
        for node in state.get("nodes", []):
            shutil.rmtree(node["temp_dir"], ignore_errors=True)
    state["nodes"], state["mlflow"] = [], None
    save_state(state_dir, state)
    print("stopped: " + ", ".join(f"{k} ({n} processes, {t} s)"
                                  for k, (n, t) in stopped.items()))
    print(f"kept: {state_dir} (mlflow.db, mlartifacts/, logs/)")
    return 0


def _print_status(state: dict) -> None:
    for n in state.get("nodes", []):
        extra = f"  dashboard {n['dashboard_url']}  gcs {n['gcs_address']}" \
            if n["role"] == "head" else ""
        print(f"ray {n['role']:<7} pid {n['pid']:<8} {'up' if alive(n['pid']) else 'DOWN':<5}"
              f"{extra}  log {n['log']}")
    if state.get("mlflow"):
        m = state["mlflow"]
        print(f"mlflow       pid {m['pid']:<8} {'up' if alive(m['pid']) else 'DOWN':<5}"
              f"  {m['uri']}  backend {m['backend_store_uri']}  artifacts "
              f"{m['artifacts_destination']}")
    head = next((n for n in state.get("nodes", []) if n["role"] == "head"), None)
    if head and alive(head["pid"]):
        try:
            print(f"ALIVE nodes: {len(alive_nodes(head['dashboard_url']))}")
        except Exception as exc:  # status must work even when the head is unhealthy
            print(f"ALIVE nodes: unknown ({type(exc).__name__})")
    for line in env_lines(state):
        print(line)


def cmd_status(args: argparse.Namespace) -> int:
    state = load_state(Path(args.dir).resolve())
    if not state.get("nodes") and not state.get("mlflow"):
        print("not running")
        return 1
    _print_status(state)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=DEFAULT_DIR,
                        help="state dir: state.json, logs, mlflow.db, mlartifacts/")
    sub = parser.add_subparsers(dest="command", required=True)

    def node_flags(p: argparse.ArgumentParser, cpus: str, gpus: str) -> None:
        p.add_argument(f"--{cpus}", type=int, default=None,
                       help="logical CPUs of the node (default: Ray detects them)")
        p.add_argument(f"--{gpus}", type=int, default=None,
                       help="GPUs of the node (default: Ray detects them)")

    p = sub.add_parser("up", help="start MLflow server + Ray head (+ --extra-nodes raylets)")
    p.add_argument("--host", default=HOST,
                   help="interface the dashboard and MLflow bind (default 127.0.0.1; see "
                        "README before using anything else)")
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--ray-port", type=int, default=6379, help="GCS port of the head")
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--allowed-hosts", default=None,
                   help="MLflow --allowed-hosts when serving beyond localhost")
    p.add_argument("--no-mlflow", action="store_true", help="Ray only")
    node_flags(p, "num-cpus", "num-gpus")
    p.add_argument("--extra-nodes", type=int, default=0,
                   help="raylets to start beside the head (default 0)")
    p.add_argument("--worker-cpus", type=int, default=None, help="logical CPUs per extra raylet")
    p.add_argument("--worker-gpus", type=int, default=None, help="GPUs per extra raylet")
    p.add_argument("--object-store-mb", type=int, default=None,
                   help="object store per node (default: Ray's, 30%% of memory)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("add-node", help="start one more raylet joined to the head")
    node_flags(p, "num-cpus", "num-gpus")
    p.add_argument("--object-store-mb", type=int, default=None)
    p.set_defaults(func=cmd_add_node)

    p = sub.add_parser("kill-node", help="SIGKILL the last worker node's raylet (failure drill)")
    p.set_defaults(func=cmd_kill_node)
    sub.add_parser("status", help="what runs, where").set_defaults(func=cmd_status)
    p = sub.add_parser("down", help="stop everything this state dir started")
    p.add_argument("--keep-ray-temp", action="store_true",
                   help="keep Ray's temp dirs (session logs) under /tmp")
    p.set_defaults(func=cmd_down)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
