"""One training run's pieces, built once: the stack (bfly.core.stack), its inputs, its log and stop request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bfly.core import stack
from bfly.core.config import Config, ConfigError
from bfly.core.data.inputs import EvalInput, TrainInput, build_eval_input, build_train_input, shm_free, shm_warning
from bfly.core.data.metadata import DatasetMeta
from bfly.core.data.sampling import StepPlan
from bfly.core.engine import Trainer
from bfly.core.env import DistEnv
from bfly.core.stopping import StopRequest
from bfly.run.runlog import RunLog


@dataclass(frozen=True)
class Run:
    """The pieces of one training run, built once (build_run) and not changed after."""

    cfg: Config
    env: DistEnv
    meta: DatasetMeta
    run_dir: Path
    log: RunLog
    device: torch.device
    raw_model: nn.Module
    trainer: Trainer
    plan: StepPlan
    train_input: TrainInput
    eval_inputs: dict[str, EvalInput]
    stop: StopRequest


def build_run(
    cfg: Config, env: DistEnv, meta: DatasetMeta, run_dir: Path, log: RunLog, device: torch.device, stop: StopRequest
) -> Run:
    stack.configure_backends(cfg, device)
    plan = StepPlan.make(cfg.train.batch_size, env.world_size, cfg.train.micro_batch_size)
    stack.check_ddp_plan(cfg.dist, plan)
    raw = stack.place_model(stack.init_model(cfg, meta.num_classes), cfg, device, env.distributed and cfg.model.sync_bn)
    train_input = build_train_input(cfg, meta, plan, env.rank, device)
    steps = train_input.steps_per_epoch
    if steps == 0:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the train split "
            f"({len(meta.splits['train'].paths)} images): no full batch per epoch"
        )
    trainer = stack.build_trainer(cfg, raw, device, meta.num_classes, plan.accum_steps, steps, ddp=env.distributed)
    eval_bs = stack.eval_batch_size(cfg, env.world_size)
    if note := shm_warning(cfg, plan, eval_bs, env.local_world_size, shm_free()):  # rank 0's node stands for all
        log.warn(note)
    eval_inputs = {
        s: build_eval_input(cfg, meta, s, env.rank, env.world_size, eval_bs, device) for s in cfg.train.eval_splits
    }
    return Run(cfg, env, meta, run_dir, log, device, raw, trainer, plan, train_input, eval_inputs, stop)
