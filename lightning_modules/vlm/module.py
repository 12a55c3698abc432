"""LightningModule of the code VLM: mixed code / bbox VQA next-token loss (paper 4.2).

The loss is the cross-entropy of the answer tokens only (prompt, image and padding tokens carry
label -100, see ``datamodules.vqa.VQACollator``), averaged over all answer tokens of the batch,
each sample's tokens weighted by its importance weight (subsampled intermediate frames, see
``datamodules.vqa``); ``train/loss_code`` and ``train/loss_bbox`` restrict it to one kind.

Validation metrics (torchmetrics, on held-out episodes) use teacher forcing: a sample is an exact
match when the argmax at every answer position, EOS included, is the target token, which is
exactly when greedy decoding would reproduce the answer.

* ``val/code_em``: code samples (without the key-step request) answered exactly;
* ``val/keystep_em``: key-step requests answered with exactly the next key-step line;
* ``val/keystep_acc``: code samples whose key-step/commented decision (the greedy first token
  starts with ``#`` or not) is right;
* ``val/bbox_acc``: grounding questions answered exactly.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from configs.errors import CheckpointError
from datamodules.vqa import BBOX, CODE, PromptFormat
from lightning_modules.training import adamw, read_checkpoint

from .model import build_vlm, export_vlm

PROCESSOR_KEY = "vlm_processor_files"


def answer_stats(logits: torch.Tensor, labels: torch.Tensor, answer_start: torch.Tensor,
                 comment_token: torch.Tensor) -> dict:
    """Per-sample teacher-forced statistics.

    logits (B, L, V), labels (B, L) with -100 off the answer, answer_start (B,), comment_token (V,)
    bool. Returns token_loss (B, L-1) (0 off the answer), n_tokens (B,), exact (B,) bool and
    pred_key_step (B,) bool (the greedy first answer token does not start a comment).
    """
    targets = labels[:, 1:]
    logits = logits[:, :-1].float()
    mask = targets != -100
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none") * mask
    pred = logits.argmax(-1)
    exact = ((pred == targets) | ~mask).all(1)
    first = pred.gather(1, (answer_start - 1).clamp(min=0)[:, None])[:, 0]
    return {"token_loss": token_loss, "n_tokens": mask.sum(1), "exact": exact,
            "pred_key_step": ~comment_token[first]}


class VLMModule(L.LightningModule):
    """LLaVA code VLM. ``model_cfg``/``optim_cfg``/``inference_cfg``: the config sections
    ``model``, ``optim`` and ``inference``; ``processor``: its ``LlavaProcessor``."""

    def __init__(self, model_cfg: dict, optim_cfg: dict, inference_cfg: dict, processor,
                 prompt_template: str = PromptFormat.template):
        super().__init__()
        self.save_hyperparameters(ignore=["processor"])
        self.processor = processor
        self.model = build_vlm(OmegaConf.create(model_cfg), processor)
        self.peft = bool(model_cfg["lora"]["enabled"])
        self.strict_loading = not self.peft  # LoRA checkpoints hold the trainable weights only
        tok = processor.tokenizer
        vocab = self.model.get_output_embeddings().weight.shape[0]
        comment = torch.zeros(vocab, dtype=torch.bool)
        for i in range(min(vocab, len(tok))):
            comment[i] = tok.decode([i]).lstrip().startswith("#")
        self.register_buffer("comment_token", comment, persistent=False)
        self.val_metrics = torch.nn.ModuleDict({
            "code_em": MeanMetric(), "keystep_em": MeanMetric(), "keystep_acc": BinaryAccuracy(),
            "bbox_acc": MeanMetric(), "loss": MeanMetric(), "loss_code": MeanMetric(), "loss_bbox": MeanMetric(),
        })

    # ------------------------------------------------------------------ steps
    def forward_stats(self, batch: dict) -> dict:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"].to(self.pixel_dtype))
        return answer_stats(out.logits, batch["labels"], batch["answer_start"], self.comment_token)

    @property
    def llava(self):
        """The LlavaForConditionalGeneration inside (under the peft wrapper with LoRA)."""
        return self.model.get_base_model() if self.peft else self.model

    @property
    def pixel_dtype(self) -> torch.dtype:
        return next(self.llava.model.vision_tower.parameters()).dtype

    @staticmethod
    def _mean_loss(stats: dict, weight: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted mean over answer tokens: sum_i w_i sum_t loss_it / sum_i w_i n_i."""
        tl, n = stats["token_loss"].sum(1), stats["n_tokens"]
        if which is not None:
            tl, n, weight = tl[which], n[which], weight[which]
        return (tl * weight).sum() / (n * weight).sum().clamp(min=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        stats = self.forward_stats(batch)
        weight = batch["weight"].to(stats["token_loss"].dtype)
        loss = self._mean_loss(stats, weight)
        B = len(batch["kind"])
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        for name, kind in (("code", CODE), ("bbox", BBOX)):
            which = batch["kind"] == kind
            if which.any():
                self.log(f"train/loss_{name}", self._mean_loss(stats, weight, which).detach(),
                         batch_size=int(which.sum()))
        code = (batch["kind"] == CODE) & ~batch["request"]
        if code.any():
            self.log("train/code_em", stats["exact"][code].float().mean(), batch_size=int(code.sum()))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        stats = self.forward_stats(batch)
        m = self.val_metrics
        kind, request = batch["kind"], batch["request"]
        n = stats["n_tokens"]
        m["loss"].update(stats["token_loss"].sum(1) / n.clamp(min=1), n)  # token-weighted mean
        code, ks, bbox = (kind == CODE) & ~request, (kind == CODE) & request, kind == BBOX
        for which, loss_name in ((kind == CODE, "loss_code"), (bbox, "loss_bbox")):
            if which.any():
                m[loss_name].update(stats["token_loss"][which].sum(1) / n[which].clamp(min=1), n[which])
        if code.any():
            m["code_em"].update(stats["exact"][code].float())
            m["keystep_acc"].update(stats["pred_key_step"][code].long(), batch["key_step"][code].long())
        if ks.any():
            m["keystep_em"].update(stats["exact"][ks].float())
        if bbox.any():
            m["bbox_acc"].update(stats["exact"][bbox].float())

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            if metric.update_count:
                self.log(f"val/{name}", metric.compute(), prog_bar=name in ("loss", "code_em"))
            metric.reset()

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        o = self.hparams.optim_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = adamw(params, lr=o["lr"], betas=o["betas"], weight_decay=o["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer else 1
        warmup = int(o["warmup_steps"])
        floor = float(o["min_lr_ratio"])

        def schedule(step: int) -> float:  # linear warmup, then cosine to min_lr_ratio
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[PROCESSOR_KEY] = processor_files(self.processor)
        if self.peft:  # keep only what is trained; the base weights come from the hub again
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> "VLMModule":
        """Rebuild a module from a Lightning checkpoint written by this class (no config needed)."""
        ckpt = read_checkpoint(path, "VLM checkpoint (make train-vlm)")
        if PROCESSOR_KEY not in ckpt:
            raise CheckpointError(f"{path} is not a VLM checkpoint (no stored processor; a DP's goes to DP=...)")
        hp = ckpt["hyper_parameters"]
        module = cls(hp["model_cfg"], hp["optim_cfg"], hp["inference_cfg"],
                     processor_from_files(ckpt[PROCESSOR_KEY]), hp.get("prompt_template", PromptFormat.template))
        module.load_state_dict(ckpt["state_dict"], strict=not module.peft)
        return module.eval()

    def export(self, folder) -> Path:
        """``save_pretrained``-style folder for ``policies.vlm_planner.VLMPlanner.from_pretrained``."""
        meta = {"prompt_template": self.hparams.prompt_template, **dict(self.hparams.inference_cfg)}
        return export_vlm(self.model, self.processor, folder, meta)


def processor_files(processor) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as d:
        processor.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def processor_from_files(files: dict[str, bytes]):
    from transformers import LlavaProcessor

    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        return LlavaProcessor.from_pretrained(d)


__all__ = ["VLMModule", "answer_stats", "processor_files", "processor_from_files"]
