"""Where the jobs run: the Ray cluster at RAY_ADDRESS, or a new local one.

`ray.init()` with no address would attach to whatever cluster `ray start` last left on this
machine (/tmp/ray/ray_current_cluster); the workflow's contract is stricter: RAY_ADDRESS
when set (as under `ray job submit`), otherwise a local Ray started by the job itself.
"""

from __future__ import annotations

import os


def init_ray(**kwargs) -> None:
    import ray

    if ray.is_initialized():
        return
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", **kwargs)
