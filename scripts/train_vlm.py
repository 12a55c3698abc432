"""`make train-vlm`: train the code VLM (paper 4.2) on the VQA samples of an oracle dataset.

Usage: train_vlm.py [DATASET=L0] [DATA=data/oracle] [PRESET=cpu|paper] [RESUME=auto] [OUT=...]
[STEPS=...] [key=value ...]. Writes TensorBoard logs, checkpoints and ``<OUT>/export`` (the
VLM as a ``save_pretrained`` folder for ``VLMPlanner.from_pretrained`` and ``make relabel-dp``).
"""

import sys

from configs import cli_config, run_entry_point, to_yaml

ALIASES = {"DATASET": "tasks", "TASKS": "tasks", "DATA": "data_dir", "PRESET": "preset", "RESUME": "resume",
           "OUT": "out", "STEPS": "trainer.max_steps"}


def prepare(cfg):
    """Check the inputs and build (module, datamodule, checkpoint to resume); raises on bad input."""
    import torch

    from configs import ConfigError
    from datamodules.dataset import dataset_files, resolve_dataset_tasks
    from datamodules.vqa import PromptFormat, VQADataModule
    from lightning_modules.training import resolve_resume
    from lightning_modules.vlm.model import pretrained_processor, tiny_processor
    from lightning_modules.vlm.module import PROCESSOR_KEY, VLMModule, processor_from_files
    from lightning_modules.vlm.tokenizer import train_tokenizer

    files = dataset_files(cfg.data_dir, resolve_dataset_tasks(cfg.tasks, cfg.data_dir))
    ckpt = resolve_resume(cfg, PROCESSOR_KEY, "VLM checkpoint (make train-vlm)")
    fmt = PromptFormat(cfg.prompt_template)
    dm = VQADataModule(cfg.data, files, fmt=fmt, max_length=cfg.model.max_length)
    if dm.val_set is None:
        raise ConfigError("no validation episodes: every task needs >= 2 episodes and data.val_fraction > 0")
    if ckpt is not None:  # the tokenizer must be the one the checkpoint was trained with
        processor = processor_from_files(torch.load(ckpt, map_location="cpu", weights_only=False)[PROCESSOR_KEY])
    elif cfg.model.pretrained:
        processor = pretrained_processor(cfg.model.text_model, cfg.model.vision_model)
    else:
        tokenizer = train_tokenizer(dm.train_set.corpus(), cfg.model.tokenizer.vocab_size,
                                    cfg.model.tokenizer.min_frequency)
        processor = tiny_processor(tokenizer, cfg.model.image_size, cfg.model.vision.patch_size)
    dm.set_processor(processor)
    module = VLMModule(to_container(cfg.model), to_container(cfg.optim), to_container(cfg.inference),
                       processor, cfg.prompt_template)
    return module, dm, ckpt


def to_container(section) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(section, resolve=True)


def main(argv: list[str]) -> int:
    cfg = cli_config("vlm", argv, ALIASES)
    module, dm, ckpt = prepare(cfg)
    from pathlib import Path

    from lightning_modules.training import fit, make_trainer

    print(to_yaml(cfg))
    n_train, n_val = len(dm.train_set), len(dm.val_set)
    print(f"VQA samples: train {n_train} ({(dm.train_set.kinds() == 0).mean():.0%} code), val {n_val}; "
          f"vocabulary {len(module.processor.tokenizer)}; "
          f"{sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters")
    trainer = make_trainer(cfg, monitor="val/loss")
    fit(trainer, module, dm, ckpt)
    if trainer.is_global_zero:
        export = module.export(Path(cfg.out) / "export")
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        print(f"\nvalidation: {metrics}")
        print(f"wrote {cfg.out}/checkpoints/ and {export} (VLMPlanner.from_pretrained / make relabel-dp VLM=...)")
    return 0


if __name__ == "__main__":
    run_entry_point(main)
