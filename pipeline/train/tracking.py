"""Metric trackers of a training run (TensorBoard, Weights & Biases), on the main process only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.train.config import TrainConfig


class Trackers:
    """Scalars to every tracker ``cfg`` asks for; does nothing where none is open (other ranks)."""

    def __init__(self, cfg: TrainConfig, out: Path, is_main: bool) -> None:
        self.tensorboard: Any = None
        self.wandb_run: Any = None
        if not is_main:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb (flag --wandb) needs the wandb package: pip install 'kdpipe[wandb]'") from None
            self.wandb_run = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(out),
                                        config=json.loads(cfg.model_dump_json()))

    def log(self, values: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for k, v in values.items():
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
