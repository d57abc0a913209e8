"""The services of the local stack (cluster/local.py): Ray nodes (a head, extra raylets) and
the MLflow tracking server, each started as the leader of its own session
(cluster/processes.py) and waited for until it answers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path

from cluster.processes import (
    BIN,
    HOST,
    ClusterError,
    child_env,
    port_in_use,
    spawn,
    wait_ready,
)
from pipelines.runtime import free_port


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
    wait_ready("ray head", lambda: dashboard_ready(url) and _node_alive(url, name), pid, log,
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
    wait_ready(f"ray worker node {name}", lambda: _node_alive(dashboard_url, name), pid, log,
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
    wait_ready("mlflow server", lambda: mlflow_ready(uri), pid, log, timeout)
    return {"pid": pid, "uri": uri, "backend_store_uri": backend,
            "artifacts_destination": artifacts, "log": str(log)}
