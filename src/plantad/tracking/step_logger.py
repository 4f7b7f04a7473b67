"""Per-step training metrics to an MLflow run, from inside a training worker (rank 0 only)."""

from __future__ import annotations

import time


class MlflowStepLogger:
    """Buffers step metrics and sends them in batches (one HTTP call per `every` steps)."""

    def __init__(self, tracking_uri: str, run_id: str, every: int = 10) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.every = max(1, every)
        self._pending: list = []

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(f"train/{k}", float(v), now, step) for k, v in logs.items())
        if step % self.every == 0:
            self.flush()

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Per-epoch summaries (mean loss, images/s) as `epoch/<name>`, sent at once."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(f"epoch/{k}", float(v), now, epoch) for k, v in metrics.items())
        self.flush()

    def flush(self) -> None:
        if self._pending:
            self.client.log_batch(self.run_id, metrics=self._pending)
            self._pending = []
