"""The ways `workflow.py train` stops that a user acts on: each message says what to do."""

from __future__ import annotations

from pathlib import Path


class TrainError(RuntimeError):
    """Training cannot start; the message says why and what to do."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: which run stopped, and the command that continues it."""

    def __init__(self, name: str, storage: str, run_id: str):
        super().__init__(name)
        self.name, self.storage, self.run_id = name, storage, run_id

    def __str__(self) -> str:
        storage = "" if self.storage == "checkpoints" or \
            Path(self.storage) == Path("checkpoints").resolve() else f" --storage {self.storage}"
        return (f"run {self.name} stopped (MLflow run {self.run_id} marked KILLED); continue "
                f"it from its last checkpoint with `python workflow.py train --resume "
                f"--name {self.name}{storage}`")


class TrackingPending(RuntimeError):
    """Training finished and its checkpoints are safe, but MLflow did not answer in time:
    the run's metrics, model and aliases wait for `workflow.py register --run`."""

    exit_status = 3
