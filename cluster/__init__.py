"""How the workflow runs beyond one process: a local Ray head + MLflow tracking server
(`python -m cluster up|add-node|status|kill-node|down`, in `cluster/local.py`), the runtime
env for `ray job submit` (`runtime_env.yaml`), a Ray cluster launcher YAML (`aws-gpu.yaml`)
and a KubeRay RayJob manifest (`kuberay-rayjob.yaml`). See README "From laptop to cluster"."""
