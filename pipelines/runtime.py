"""Where the jobs run: the Ray cluster at RAY_ADDRESS, or a new local one.

`ray.init()` with no address would attach to whatever cluster `ray start` last left on this
machine (/tmp/ray/ray_current_cluster); the workflow's contract is stricter: RAY_ADDRESS
when set (as under `ray job submit`), otherwise a local Ray started by the job itself.
"""

from __future__ import annotations

import os
import sys

# A Ray started just for one command and gone when it ends: no dashboard and no metrics
# export. Measured on 5,000 images (benchmarks/preprocess.py): together 22% of the job's CPU
# on a 2-core machine, and ~0.9 s of the local Ray's start (4.9 -> 4.0 s), for pages nobody
# opens before the Ray they describe is gone; Ray Data's progress bars show the progress.
# Long training runs keep the dashboard (train does not ask for `lean`).
LEAN_LOCAL = {"include_dashboard": False, "_system_config": {"enable_metrics_collection": False}}


def other_rays() -> int:
    """How many Ray clusters (their GCS servers) already run on this machine."""
    import psutil

    count = 0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "gcs_server":
            count += 1
    return count


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the OS picks it; another process may take it later)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_ray(*, lean: bool = False, local_cpus: int | None = None, **kwargs) -> bool:
    """Connect to RAY_ADDRESS, or start a local Ray (`lean`: without dashboard and metrics;
    `local_cpus`: its logical CPUs, default the machine's cores). Returns True only when this
    call started a local Ray, whose size the caller then knows is this machine's.

    The choice is deliberate: RAY_ADDRESS (as `ray job submit` sets it, or `auto` for the
    cluster `ray start` left on this machine) or a Ray of this command's own, never whatever
    `ray.init()` would guess. When other Rays run on the machine, one line says which is used."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return False
    local = dict(LEAN_LOCAL) if lean else {}
    if local_cpus:
        local["num_cpus"] = local_cpus
    # Ray turns token authentication on for a new local cluster (good: it stays on) and
    # warns that it did, at WARNING level, on every command. Setting RAY_AUTH_MODE=token
    # ourselves would say the same without the warning, but Ray reads its config once per
    # process, before this point, and then refuses its own new cluster's token. So the one
    # logger that says it is turned down; other warnings show.
    import logging

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    # No spot nodes to drain on a Ray of our own: Ray Train's preemption watcher would only
    # add an actor and a core_worker error line ("constructor arguments in the object store").
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    others = other_rays()
    if others:
        print(f"note: {others} other Ray cluster(s) run on this machine; this command starts "
              "its own local Ray (to use a running one instead: RAY_ADDRESS=auto, or its "
              "address)", file=sys.stderr, flush=True)
        if not lean:
            # Ray Train's actors find the cluster through the State API, which without an
            # address looks for a Ray on the machine and fails on finding several (25 lines
            # of ConnectionError a run). Its dashboard's address, fixed before it starts,
            # reaches every worker process through the environment.
            port = free_port()
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            local["dashboard_port"] = port
    ray.init(address="local", **kwargs, **local)
    return True


def stop_local_ray(started: bool) -> None:
    """Stop the local Ray this command started (`started`: what init_ray returned) now, not in
    Ray's exit hook, which first sleeps 0.5 s so that worker log lines reach the driver; the
    lean local Ray sends none (log_to_driver=False). A Ray at RAY_ADDRESS is left running."""
    if started:
        import ray

        ray.shutdown()


def cluster_cpus() -> int:
    """Logical CPUs of the connected Ray cluster, at least 1: how many one-CPU tasks run at once."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
