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

Why sessions and not `ray stop`: `ray stop` kills every Ray process of the machine's user (it
matches process names), including clusters this stack did not start. Every process here leads
a session of its own and is stopped as that session (cluster/processes.py), so nothing started
here outlives `down` and nothing else is touched. The services themselves (Ray nodes, the
MLflow server) are started and awaited in cluster/services.py; this module is the command:
the state file and the up/add-node/status/kill-node/down steps.

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
import shutil
import sys
import time
from pathlib import Path

from cluster.processes import (
    HOST,
    ClusterError,
    alive,
    kill_raylet,
    stop_session,
)
from cluster.services import alive_nodes, start_head, start_mlflow, start_worker
from pipelines.files import atomic_write

DEFAULT_DIR = ".cluster"
STATE = "state.json"


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
    atomic_write(state_dir / STATE, json.dumps(state, indent=1))


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
        server = state["mlflow"]
        timed("mlflow", stop_session, server["pid"], marker=server["artifacts_destination"])
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
    for node in state.get("nodes", []):
        extra = f"  dashboard {node['dashboard_url']}  gcs {node['gcs_address']}" \
            if node["role"] == "head" else ""
        print(f"ray {node['role']:<7} pid {node['pid']:<8} "
              f"{'up' if alive(node['pid']) else 'DOWN':<5}{extra}  log {node['log']}")
    if state.get("mlflow"):
        server = state["mlflow"]
        print(f"mlflow       pid {server['pid']:<8} {'up' if alive(server['pid']) else 'DOWN':<5}"
              f"  {server['uri']}  backend {server['backend_store_uri']}  artifacts "
              f"{server['artifacts_destination']}")
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
