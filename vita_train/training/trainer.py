"""The training loop: one process or many under torchrun, mixed precision, clipping, checkpoints, logs."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..losses import VitaLoss
from ..utils.atomic import atomic_write
from ..modeling.vita_model import VitaModel
from . import distributed
from .config import TrainConfig
from .datasets import build_dataset, build_train_loader_from_config
from .init_weights import freeze_detector, init_backbone, init_from_checkpoint
from .metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsLogger
from .optim import build_optimizer, build_scheduler, lr_factor, parameter_groups
from .paths import is_within
from .state import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    ResumeError,
    TrainingState,
    config_changes,
    last_checkpoint,
    load_training_checkpoint,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
FINAL_CHECKPOINT = "model_final.pth"
# everything a run writes into its output_dir
RUN_OUTPUTS = (CONFIG_FILE, METRICS_FILE, FINAL_CHECKPOINT, LAST_CHECKPOINT, CHECKPOINT_DIR, TENSORBOARD_DIR)


class TrainingError(RuntimeError):
    """Training stopped for a reason the message names (a non-finite loss, a bad output directory...)."""


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    output_dir: Path
    final_checkpoint: Path
    steps: int
    last_losses: dict[str, float]


class TrainStep(nn.Module):
    """Model + criterion as one module, so DistributedDataParallel sees the whole forward."""

    def __init__(self, model: VitaModel, criterion: VitaLoss, num_query_layers: int) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.num_query_layers = num_query_layers

    def forward(self, clips: list[dict], generators: Optional[list[torch.Generator]] = None) -> dict[str, Tensor]:
        """Weighted losses of one batch of clips."""
        frame_outputs, vita_outputs = self.model.forward_train([c["images"] for c in clips], self.num_query_layers)
        padded_hw = tuple(frame_outputs["pred_masks"].shape[-2:])
        padded_hw = (padded_hw[0] * 4, padded_hw[1] * 4)
        return self.criterion(frame_outputs, vita_outputs, clips, padded_hw, generators=generators)


def pick_device(name: str) -> torch.device:
    """``auto`` = the local CUDA device when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={name}, but torch sees no CUDA device here; use device=cpu or device=auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={name}, but torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``solver.amp`` on ``device`` (None = full precision)."""
    if mode == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def clip_generators(seed: int, step: int, first_index: int, count: int, device: torch.device) -> list[torch.Generator]:
    """One RNG per clip, keyed by (seed, step, global clip index): point sampling in the loss then does not
    depend on how the batch is split over processes, and a resumed run draws the same points."""
    gens = []
    for i in range(count):
        g = torch.Generator(device=device)
        g.manual_seed(hash((seed, step, first_index + i)) & 0x7FFF_FFFF_FFFF_FFFF)
        gens.append(g)
    return gens


def _to_device(clip: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in clip.items()}


def build_model(cfg: TrainConfig) -> VitaModel:
    """The model of ``cfg`` with its starting weights, frozen parts and train mode set."""
    model = VitaModel(cfg.model)
    if cfg.backbone_init:
        init_backbone(model, cfg.backbone_init)
    if cfg.init:
        init_from_checkpoint(model, cfg.init)
    if cfg.freeze_detector:
        log.info("frozen detector: %d tensors fixed, only the VITA module trains", freeze_detector(model))
    return model.train()


def _check_output_dir(output_dir: Path, resume: bool | str, inputs: dict[str, str]) -> Optional[Path]:
    """The checkpoint to resume from (or None); refuses, before anything is written, a run that would overwrite
    files it did not write itself. ``inputs`` names the user's files (recipe, init...) by what they are."""
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"output_dir {output_dir} is a file, not a folder; choose another output_dir")
    if isinstance(resume, str) and resume:
        resume_from: Optional[Path] = Path(resume)
        if not resume_from.is_file():
            raise ResumeError(f"--resume {resume_from}: no such checkpoint")
        # only a checkpoint of the run in output_dir makes that run's files its own
        own_run = is_within(resume_from, output_dir / CHECKPOINT_DIR)
    else:
        resume_from = last_checkpoint(output_dir) if resume and output_dir.is_dir() else None
        own_run = resume_from is not None
    if own_run:
        return resume_from
    existing = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if not existing:
        if resume is True:
            log.warning("nothing to resume in %s: starting a new run", output_dir)
        return resume_from
    held = ", ".join(existing)
    for what, given in inputs.items():
        for name in existing:
            if given and is_within(Path(given), output_dir / name):
                raise TrainingError(
                    f"the {what} {given} is in the way of the {name} this run writes into output_dir {output_dir}; "
                    "choose another output_dir (nothing was changed)"
                )
    if resume_from is not None:
        raise TrainingError(
            f"--resume {resume_from} is not a checkpoint of the run in output_dir {output_dir}, which already holds "
            f"{held}; resume into an empty output_dir, or resume that run with --resume alone (nothing was changed)"
        )
    if LAST_CHECKPOINT in existing or METRICS_FILE in existing:
        hint = "pass --resume to continue it, or choose another output_dir"
        if resume:
            hint = f"it has no {LAST_CHECKPOINT} to resume from; choose another output_dir or move its files away"
        raise TrainingError(f"{output_dir} already holds a training run ({held}); {hint} (nothing there was changed)")
    raise TrainingError(
        f"output_dir {output_dir} already holds {held}, which this run would overwrite; choose another output_dir or "
        "move them away (nothing there was changed)"
    )


def train(
    cfg: TrainConfig, resume: bool | str = False, progress: bool = False, recipe: str | Path | None = None
) -> TrainResult:
    """Run (or resume) training as ``cfg`` says (read from ``recipe``, if any); returns the final checkpoint."""
    device = pick_device(cfg.device)
    dist_info = distributed.init_distributed(device)
    output_dir = Path(cfg.output_dir)
    inputs = {"recipe": str(recipe or ""), "init checkpoint": cfg.init, "backbone_init weights": cfg.backbone_init}
    resume_from = _check_output_dir(output_dir, resume, inputs)
    if resume_from is not None:
        weights, state = load_training_checkpoint(resume_from)
        _check_resumable(cfg, state, resume_from)
    distributed.barrier()  # every process checks output_dir before the main one writes its first file there
    if cfg.solver.batch_size % dist_info.world_size:
        raise TrainingError(
            f"solver.batch_size={cfg.solver.batch_size} does not divide over {dist_info.world_size} processes"
        )
    per_rank = cfg.solver.batch_size // dist_info.world_size
    dataset = build_dataset(cfg)  # before the model: a wrong dataset path fails in seconds, not minutes

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    criterion = VitaLoss(cfg.model.num_classes, cfg.loss)
    step_module: nn.Module = TrainStep(model, criterion, cfg.loss.num_frame_query_layers)
    optimizer = build_optimizer(model, cfg.solver)
    scheduler = build_scheduler(optimizer, cfg.solver)
    dtype = amp_dtype(cfg.solver.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    start = 0
    if resume_from is not None:
        try:
            model.load_state_dict(weights)
            optimizer.load_state_dict(state.optimizer)
        except (RuntimeError, ValueError) as err:  # a checkpoint whose recorded config does not describe it
            raise ResumeError(f"{resume_from} does not fit the model of the config ({str(err).splitlines()[0]}); "
                              "resume with the run's own config.yaml") from None
        scheduler.load_state_dict(state.scheduler)
        if state.scaler is not None and scaler.is_enabled():
            scaler.load_state_dict(state.scaler)
        start = state.step
        _apply_solver(optimizer, scheduler, model, cfg, start)
        log.info("resuming %s at step %d", resume_from, start)
    if dist_info.world_size > 1:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        step_module = nn.parallel.DistributedDataParallel(step_module, **ddp_kwargs)

    loader = build_train_loader_from_config(cfg, dataset, per_rank, start, dist_info.rank, dist_info.world_size)
    batches = iter(loader)
    if resume_from is not None:
        set_rng_state(state.rng)  # after the loader drew its base seed, as the uninterrupted run did

    if dist_info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        text = cfg.to_yaml()
        atomic_write(output_dir / CONFIG_FILE, lambda f: f.write(text), binary=False)
    metrics = MetricsLogger(output_dir, start, cfg.tensorboard) if dist_info.is_main else None
    params = [p for p in model.parameters() if p.requires_grad]
    bar = None
    if progress and dist_info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.solver.max_iter, initial=start, desc="train", unit="step", dynamic_ncols=True)

    last: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        for step in range(start, cfg.solver.max_iter):
            clips = [_to_device(c, device) for c in next(batches)]
            gens = clip_generators(cfg.seed, step, dist_info.rank * per_rank, len(clips), device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                losses = step_module(clips, gens)
            total = sum(losses.values())
            _stop_if_not_finite(total, losses, step, output_dir)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, cfg.solver.clip_grad_norm)
                if cfg.solver.clip_grad_norm > 0
                else None
            )
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            done = step + 1
            window_steps += 1

            if done % cfg.log_period == 0 or done == cfg.solver.max_iter or done == start + 1:
                values = {k: float(v.detach()) for k, v in losses.items()}
                values["total_loss"] = float(total.detach())
                values = distributed.mean_over_ranks(values, device)
                elapsed = time.perf_counter() - window_start
                values["lr"] = optimizer.param_groups[0]["lr"]
                values["sec_per_step"] = elapsed / window_steps
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                window_start, window_steps = time.perf_counter(), 0
                last = values
                if metrics is not None:
                    metrics.log(done, values)
                eta = values["sec_per_step"] * (cfg.solver.max_iter - done)
                log.info("step %d/%d loss %.4f lr %.2e eta %s", done, cfg.solver.max_iter, values["total_loss"],
                         values["lr"], _fmt_eta(eta))
                if bar is not None:
                    bar.set_postfix(loss=f"{values['total_loss']:.3f}", lr=f"{values['lr']:.1e}")
            if bar is not None:
                bar.update(1)
            if done % cfg.checkpoint_period == 0 or done == cfg.solver.max_iter:
                if dist_info.is_main:
                    state = TrainingState(
                        step=done,
                        optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict() if scaler.is_enabled() else None,
                        rng=rng_state(),
                        train_config=cfg.to_yaml(),
                    )
                    save_training_checkpoint(output_dir, model, state)
                distributed.barrier()
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()

    final = output_dir / FINAL_CHECKPOINT
    if dist_info.is_main:
        from ..checkpoint.native import save_checkpoint

        save_checkpoint(final, model, extra={"recipe": cfg.to_yaml()})
    distributed.barrier()
    return TrainResult(output_dir, final, cfg.solver.max_iter, last)


# settings a resumed run cannot take from the config: the weights, and so the model, come from the checkpoint
_FIXED_ON_RESUME = ("model.", "init", "backbone_init", "freeze_detector")


def _check_resumable(cfg: TrainConfig, state: TrainingState, checkpoint: Path) -> None:
    """Refuse a resume whose config changes what the checkpoint fixes; log the changes it will apply."""
    changes = config_changes(state.train_config, cfg.to_dict())
    fixed = {k: v for k, v in changes.items() if k.startswith(_FIXED_ON_RESUME)}
    if fixed:
        listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} in the config" for k, (old, new) in fixed.items())
        raise ResumeError(
            f"the checkpoint {checkpoint} was trained with another model or start than the config ({listed}); "
            "resume with the run's own config.yaml, or start a new run from the checkpoint with init=CHECKPOINT"
        )
    for key, (old, new) in changes.items():
        if key != "output_dir":
            log.info("resume: %s changes from %r to %r", key, old, new)


def _apply_solver(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, model: nn.Module,
    cfg: TrainConfig, step: int,
) -> None:
    """Put the config's learning rates and weight decays over those the restored optimizer/schedule state holds,
    so a resume that changes them (e.g. a lower solver.base_lr after a non-finite loss) uses them."""
    groups = parameter_groups(model, cfg.solver)
    factor = lr_factor(step, cfg.solver)
    for group, fresh in zip(optimizer.param_groups, groups):
        group["initial_lr"] = fresh["lr"]
        group["lr"] = fresh["lr"] * factor
        group["weight_decay"] = fresh["weight_decay"]
    scheduler.base_lrs = [g["lr"] for g in groups]


def _stop_if_not_finite(total: Tensor, losses: dict[str, Tensor], step: int, output_dir: Path) -> None:
    """Stop every process before a non-finite loss reaches the weights or a checkpoint."""
    bad = torch.tensor([0.0 if torch.isfinite(total) else 1.0], device=total.device)
    if distributed.is_distributed():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item() == 0.0:
        return
    values = {k: float(v.detach()) for k, v in losses.items()}
    terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if not math.isfinite(v))
    ckpt = last_checkpoint(output_dir) if output_dir.is_dir() else None
    where = f"the last checkpoint, {ckpt}, is intact" if ckpt else "no checkpoint was written yet"
    raise TrainingError(
        f"the loss is not finite at step {step + 1} ({terms or 'on another process'}); training stopped before "
        f"updating the weights and {where}. Lower solver.base_lr, keep solver.clip_grad_norm on, or try "
        "solver.amp=off, then resume."
    )


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
