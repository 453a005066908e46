"""Experiment loggers: ``none`` (the store only) and ``wandb`` (config, metrics, per-layer tables).

(Named ``loggers`` rather than ``logging`` so that running ``python experiments/run.py`` does not
shadow the standard library's ``logging`` module.)

``wandb`` is imported only when the W&B logger starts, so ``logger=none`` leaves no trace of it: no
import, no ``wandb/`` directory. W&B files go under the Hydra run dir (``WANDB_DIR``); the default
mode is ``offline``, which needs no network (``wandb sync <run dir>/wandb/offline-run-*`` uploads later).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping


class NoLogger:
    """Logs nothing; the result store is the record."""

    def start(self, config: Mapping[str, Any], *, run_dir: Path, group: str, name: str) -> None:
        pass

    def log_task(self, record: Mapping[str, Any], layers: Mapping[str, Mapping[str, Any]]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """One W&B run per Hydra job: the resolved config, each task's metrics and its per-layer table."""

    def __init__(self, *, mode: str, project: str, entity: str | None, tags: list[str]):
        self.mode, self.project, self.entity, self.tags = mode, project, entity, tags
        self._run = None

    def start(self, config: Mapping[str, Any], *, run_dir: Path, group: str, name: str) -> None:
        os.environ["WANDB_DIR"] = str(run_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, dir=str(run_dir),
                               group=group, name=name, job_type=str(config.get("method", {}).get("name", "run")),
                               tags=list(self.tags), config=dict(config), reinit="finish_previous")

    def log_task(self, record: Mapping[str, Any], layers: Mapping[str, Mapping[str, Any]]) -> None:
        task = record["task"]
        values = {f"{task}/{k}": v for k, v in record["metrics"].items()}
        values[f"{task}/bits_per_param"] = record["bits_per_param"]
        values.update({f"{task}/time/{k}": v for k, v in record["timings"].items()})
        columns = ["layer", "shape", "bits_per_param", "rel_error"]
        rows = [[n, "x".join(map(str, s["shape"])), s["bits_per_param"], s.get("rel_error")]
                for n, s in layers.items()]
        values[f"{task}/layers"] = self._wandb.Table(columns=columns, data=rows)
        self._run.log(values)
        self._run.summary.update({k: v for k, v in values.items() if not k.endswith("/layers")})

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def make_logger(cfg: Mapping[str, Any]) -> NoLogger | WandbLogger:
    if cfg["name"] == "wandb":
        return WandbLogger(mode=cfg["mode"], project=cfg["project"], entity=cfg.get("entity"),
                           tags=list(cfg.get("tags") or []))
    return NoLogger()
