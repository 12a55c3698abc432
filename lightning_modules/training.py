"""Shared training plumbing of the entry points (``make train-dp``, ``make train-vlm``).

A config with sections ``trainer`` (keyword arguments of ``lightning.Trainer``), ``out`` (the run
folder) and ``resume`` (null, ``auto`` or a checkpoint path) becomes a Trainer with TensorBoard
logging under ``<out>/``, ``last.ckpt`` and best checkpoints under ``<out>/checkpoints/``, a
learning-rate monitor, and the resolved config saved as ``<out>/config.yaml``. Where the progress
bar is off or stdout is not a terminal (a log file), progress comes as plain lines instead
(:class:`callbacks.progress.ProgressLines`). With ``threads_file`` set, the intra-op threads follow
the integer in that file (:class:`callbacks.threads.ThreadsFromFile`).

A run folder that already holds checkpoints is never overwritten: without ``resume`` it is an
error that says how to continue it or where to start afresh.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from configs.errors import CheckpointError, MissingInputError, UserError


class RunError(UserError, ValueError):
    """A run folder or resume request that cannot be honoured; the message says why."""


def read_checkpoint(path, what: str = "checkpoint") -> dict:
    """``torch.load`` a checkpoint file on the CPU; a missing file, or one that is not a
    checkpoint (truncated, foreign), raises a user error naming ``what`` was expected."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"no {what} at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a {what}: it cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'empty'})") from None
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path} is not a {what} (it holds a {type(blob).__name__})")
    return blob


def resolve_resume(cfg: DictConfig, marker: str | None = None, what: str = "checkpoint") -> str | None:
    """The checkpoint to resume from, or None for a fresh run (checks the run folder). An
    explicit ``RESUME=path`` must be a Lightning checkpoint holding the key ``marker`` (the kind
    the command trains; ``what`` names it in the error)."""
    out = Path(cfg.out)
    last = out / "checkpoints" / "last.ckpt"
    resume = cfg.get("resume")
    if resume in (None, "", "none", "null"):
        if any((out / "checkpoints").glob("*.ckpt")):
            raise RunError(f"{out} already holds checkpoints; resume it with RESUME=auto, or pick a new "
                           f"folder with OUT=...")
        return None
    if resume == "auto":
        return str(last) if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise RunError(f"RESUME={resume}: no such checkpoint file")
    blob = read_checkpoint(path, what)
    if "state_dict" not in blob or (marker is not None and marker not in blob):
        raise CheckpointError(f"RESUME={resume} is not a {what} (a Lightning checkpoint with {marker!r} expected)")
    return str(path)


def fit(trainer: L.Trainer, module, datamodule, ckpt_path: str | None) -> None:
    """``trainer.fit``; a Ctrl-C (which Lightning turns into a graceful stop and ``exit(1)``)
    becomes ``KeyboardInterrupt`` again, so the entry point reports it as an interruption (exit
    130). The last checkpoint is kept: ``RESUME=auto`` continues."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise


def adamw(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0) -> "torch.optim.AdamW":
    """``torch.optim.AdamW``, fused (one kernel over all tensors) where the parameters' device has
    the fused kernel (CPU, CUDA). On the CPU torch's default is a per-tensor loop: for the cpu preset
    DP it took 18-26 ms per step against 7-9 ms fused, of a training step of 200-270 ms, so fused
    trains about 5 % more steps per hour (benchmarks/train_step.py). The update is AdamW's either
    way (equal up to float rounding)."""
    import torch

    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None)


def make_trainer(cfg: DictConfig, *, monitor: str = "val/loss", callbacks=()) -> L.Trainer:
    """A Trainer for ``cfg`` (see the module docstring); ``callbacks`` are added to the defaults."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    logger = TensorBoardLogger(save_dir=str(out), name="", version="tb", default_hp_metric=False)
    ckpt = ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="best-{step}", monitor=monitor,
                           mode="min", save_top_k=1, save_last=True, auto_insert_metric_name=False)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    callbacks = [ckpt, LearningRateMonitor(logging_interval="step"), *callbacks]
    if not trainer_kwargs.get("enable_progress_bar", True) or not sys.stdout.isatty():
        from callbacks.progress import ProgressLines

        trainer_kwargs["enable_progress_bar"] = False  # a redrawn bar shows nothing in a log file
        callbacks.append(ProgressLines())
    if cfg.get("threads_file"):
        from callbacks.threads import ThreadsFromFile

        callbacks.append(ThreadsFromFile(cfg.threads_file))
    return L.Trainer(default_root_dir=str(out), logger=logger, callbacks=callbacks, **trainer_kwargs)
