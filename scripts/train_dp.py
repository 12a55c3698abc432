"""`make train-dp`: train the diffusion policy.  Config: configs/dp.yaml (+ configs/dp/<PRESET>.yaml).

Usage: train_dp.py [DATASET=L0+L1] [CONDITIONING=code] [PRESET=cpu|paper] [RESUME=auto|path] [key=value ..]
Writes <out>/config.yaml, <out>/tb/ (TensorBoard), <out>/checkpoints/{last,best-*}.ckpt and
<out>/policy.pt (EMA weights, loadable by policies.diffusion_policy.DiffusionPolicy).
"""

import sys

from configs import cli_config, run_entry_point, to_yaml

ALIASES = {"DATASET": "tasks", "TASKS": "tasks", "DATA": "data_dir", "CONDITIONING": "conditioning",
           "PRESET": "preset", "RESUME": "resume", "OUT": "out", "SEED": "seed"}


def build(cfg):
    """(module, datamodule) for a resolved config."""
    from omegaconf import OmegaConf

    from datamodules.dataset import resolve_dataset_tasks
    from datamodules.dp_datamodule import DiffusionPolicyDataModule
    from lightning_modules.dp.model import reads_assignment_objects, reads_recorded_objects
    from lightning_modules.dp.module import DiffusionPolicyModule
    from lightning_modules.dp.processor import CONDITIONING, check_conditioning

    check_conditioning(cfg.conditioning)
    from policies.vlm_dp import check_execution

    check_execution(OmegaConf.to_container(cfg.execution))
    data_cfg = OmegaConf.to_container(cfg.data)
    if data_cfg["chunk_end"] == "auto":  # code lines end chunks; a flat DP has no lines
        data_cfg["chunk_end"] = "episode" if cfg.conditioning in ("task", "none") else "line"
    label_set = cfg.vlm_label_set if cfg.conditioning == "vlm" else CONDITIONING[cfg.conditioning]
    datamodule = DiffusionPolicyDataModule(
        cfg.data_dir, resolve_dataset_tasks(cfg.tasks, cfg.data_dir), label_set=label_set,
        shift_k=cfg.shift_k if cfg.conditioning == "code_shifted" else 0, horizon=cfg.model.horizon,
        seed=cfg.seed, observation=cfg.model.observation,
        load_state=reads_recorded_objects(cfg.model), assignment_objects=reads_assignment_objects(cfg.model),
        **data_cfg)
    stats = datamodule.stats()
    # the proprio width comes from the data: qpos + qvel + tcp_pose, 21 on our Panda, 29 on
    # ClevrSkills' xArm6 with its vacuum joints (make import-clevrskills)
    proprio_dim = sum(len(stats[k]["mean"]) for k in ("qpos", "qvel", "tcp_pose"))
    module = DiffusionPolicyModule(model={**OmegaConf.to_container(cfg.model), "conditioning": cfg.conditioning,
                                          "proprio_dim": proprio_dim},
                                   optim=OmegaConf.to_container(cfg.optim), ema=OmegaConf.to_container(cfg.ema),
                                   n_action_steps=cfg.n_action_steps, val_sample_batches=cfg.val_sample_batches,
                                   execution=OmegaConf.to_container(cfg.execution))
    module.set_stats(stats)
    return module, datamodule


def rollout_callbacks(cfg) -> list:
    """The rollout-evaluation callback of ``cfg.rollout`` ([] when it is off)."""
    r = cfg.rollout
    if r.every_n_val_epochs <= 0:
        return []
    from callbacks.rollout import RolloutEvaluation

    policy, options = r.policy, {}
    if policy == "auto":
        if r.vlm:
            policy = "vlm_dp"
        elif cfg.conditioning in ("task", "none"):
            policy = "flat_dp"
        else:  # the oracle's code lines as the high level (no VLM needed)
            policy, options = "dp_oracle", {"insert_positions": False}
    return [RolloutEvaluation(r.tasks or cfg.tasks, policy=policy, vlm=r.vlm, episodes=r.episodes,
                              every_n_val_epochs=r.every_n_val_epochs, workers=r.workers,
                              envs_per_worker=r.envs_per_worker,
                              image_size=r.image_size, max_steps=r.max_steps, video_episodes=r.video_episodes,
                              options=options)]


def main(argv: list[str]) -> int:
    cfg = cli_config("dp", argv, ALIASES)
    from pathlib import Path

    import lightning as L

    from lightning_modules.training import fit, make_trainer, resolve_resume

    resume = resolve_resume(cfg, "ema", "diffusion-policy checkpoint (make train-dp)")
    # seeded before the model is built: torch 2.13 seeds itself from the OS at start-up, so the
    # initial weights (and the whole run) differed from run to run (measured)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule = build(cfg)
    callbacks = rollout_callbacks(cfg)
    print(to_yaml(cfg))
    trainer = make_trainer(cfg, monitor="val/loss", callbacks=callbacks)
    fit(trainer, module, datamodule, resume)
    if trainer.is_global_zero:
        path = module.export_policy(Path(cfg.out) / "policy.pt")
        print(f"\nwrote {path} (EMA weights), checkpoints in {cfg.out}/checkpoints, "
              f"TensorBoard: make tensorboard  (logdir {cfg.out}/tb)")
    return 0


if __name__ == "__main__":
    run_entry_point(main)
