"""LightningModule of the diffusion policy: training, EMA, validation with DDIM-10 samples, export.

- Loss: ELBO-weighted (or uniform) epsilon MSE (``model.DiffusionPolicyModel.loss``).
- Optimiser: AdamW + cosine schedule with linear warmup. The paper's values (E.2) were lost in
  the text; the defaults are Diffusion Policy's (lr 1e-4, betas (0.95, 0.999), weight decay 1e-6,
  500 warmup steps).
- EMA of the weights with diffusers' ``EMAModel`` and Diffusion Policy's warmup schedule
  (decay = 1 - (1 + step) ** -0.75, capped at ``max_decay``). Validation, rollouts and the
  exported policy use the EMA weights; the EMA state is saved in and restored from checkpoints.
- Logs ``train/loss``, ``val/loss`` (fixed noise, comparable across epochs) and ``val/action_mse``
  (DDIM-10 samples vs recorded chunks, in normalised [-1, 1] action units, on the first
  ``val_sample_batches`` validation batches); with ``model.aux_object_weight`` also
  ``train/object_localisation_loss`` and ``val/object_localisation_loss`` (its part of the loss,
  unweighted), and ``val/first_step_object_error_cm`` beside ``val/first_step_object_distance_cm``:
  at the validation episodes' first steps, how far (xy) the head puts the first named object from
  where it is, against how far it is from the TCP (a head that cannot find it does no better).
  With ``model.object_keypoint_weight``: ``{train,val}/keypoint_heatmap_loss`` and
  ``keypoint_table_loss``, and the first-step figures of the keypoints' table positions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..training import adamw
from .model import DiffusionPolicyModel
from .state import POS_SCALE

log = logging.getLogger(__name__)

POLICY_FORMAT = "code2action-dp-policy"


class DiffusionPolicyModule(L.LightningModule):
    def __init__(self, model: dict, optim: dict | None = None, ema: dict | None = None,
                 n_action_steps: int = 8, val_sample_batches: int = 4, execution: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.optim_cfg = {"lr": 1e-4, "betas": (0.95, 0.999), "weight_decay": 1e-6, "warmup_steps": 500,
                          **(optim or {})}
        ema = {"max_decay": 0.9999, "power": 0.75, **(ema or {})}
        self.model = DiffusionPolicyModel(**model)
        self.ema = EMAModel(self.model.parameters(), decay=ema["max_decay"], use_ema_warmup=True,
                            inv_gamma=1.0, power=ema["power"])
        self._stored = False

    def set_stats(self, stats: dict) -> None:
        """Dataset normalisation statistics (``datamodules.stats.load_stats``) into the model."""
        self.model.normalizer.set_stats(stats)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        self.ema.to(self.device)
        dm = getattr(self.trainer, "datamodule", None)
        kp = self.model.keypoints
        if kp is not None and kp.table_map == "homography" and hasattr(dm, "resting_object_pixels"):
            uv, xy = dm.resting_object_pixels()  # the camera's calibration, from the training data
            median = kp.fit_homography(torch.from_numpy(uv).to(self.device), torch.from_numpy(xy).to(self.device) * POS_SCALE)
            log.info("keypoints: homography fitted to %d resting objects, median error %.2f cm", len(uv),
                     median * 100 / POS_SCALE)
        if self.model.text is not None and hasattr(dm, "unique_texts"):
            texts = sorted(dm.unique_texts())
            self.model.text.to(self.device)
            for i in range(0, len(texts), 256):  # fill the embedding cache once, up front
                self.model.text.encode(texts[i:i + 256])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(batch)
        n = len(batch["actions"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self._log_aux("train", n)
        return loss

    def _log_aux(self, stage: str, n: int) -> None:
        """``<stage>/<part>_loss`` of each auxiliary loss the model has: ``object_localisation``
        (``aux_object_weight``), ``keypoint_heatmap`` and ``keypoint_table`` (``object_keypoint_weight``)."""
        for part, value in self.model.last_losses.items():
            self.log(f"{stage}/{part}_loss", value, batch_size=n, sync_dist=stage == "val")

    def _log_first_step_localisation(self, batch: dict) -> None:
        """``val/first_step_object_error_cm`` and ``val/first_step_object_distance_cm`` (the localisation
        head at the episodes' first steps; ``DiffusionPolicyModel.first_step_localisation_cm``)."""
        if "t" not in batch:
            return
        found = self.model.first_step_localisation_cm(torch.as_tensor(batch["t"]))
        if found is not None:
            error, distance = found
            self.log("val/first_step_object_error_cm", error.mean(), batch_size=len(error), sync_dist=True)
            self.log("val/first_step_object_distance_cm", distance.mean(), batch_size=len(error), sync_dist=True)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.ema.step(self.model.parameters())

    def configure_optimizers(self):
        c = self.optim_cfg
        opt = adamw(self.model.parameters(), lr=c["lr"], betas=c["betas"], weight_decay=c["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = get_scheduler("cosine", opt, num_warmup_steps=min(c["warmup_steps"], total // 2),
                              num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ EMA swap for evaluation
    def swap_in_ema(self) -> None:
        """Put the EMA weights in the model (keeping the raw ones); undo with ``swap_out_ema``."""
        if not self._stored:
            self.ema.to(self.device)
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
            self._stored = True

    def swap_out_ema(self) -> None:
        if self._stored:
            self.ema.restore(self.model.parameters())
            self._stored = False

    def on_validation_epoch_start(self) -> None:
        self.swap_in_ema()

    def on_validation_epoch_end(self) -> None:
        self.swap_out_ema()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = len(batch["actions"])
        gen = torch.Generator().manual_seed(batch_idx)
        self.log("val/loss", self.model.loss(batch, generator=gen), batch_size=n, sync_dist=True)
        self._log_aux("val", n)
        self._log_first_step_localisation(batch)
        if batch_idx < self.hparams.val_sample_batches:
            pred = self.model.sample(batch, generator=gen)
            norm = self.model.normalizer.normalize_actions
            mse = torch.mean((norm(pred) - norm(batch["actions"].float())) ** 2)
            self.log("val/action_mse", mse, batch_size=n, sync_dist=True, prog_bar=True)

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` with the EMA weights in place of the raw parameters."""
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        for (name, _), shadow in zip(self.model.named_parameters(), self.ema.shadow_params):
            state[name] = shadow.detach().cpu().clone()
        return state

    def export_policy(self, path) -> Path:
        """Write a self-contained policy file (config, normalisation, EMA weights); returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"format": POLICY_FORMAT, "version": 1, "model": dict(self.hparams.model),
                    "n_action_steps": int(self.hparams.n_action_steps),
                    "execution": dict(self.hparams.execution or {}),
                    "state_dict": self.ema_state_dict()}, tmp)
        tmp.replace(path)
        return path
