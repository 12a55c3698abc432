"""The rollout-evaluation callback: scheduling, logging, videos, failures, and DDP all-reduce.

The module being trained is a tiny stand-in whose ``export_policy`` writes a real (randomly
initialised, tiny) diffusion-policy file in the format of ``DiffusionPolicyModule.export_policy``,
so the callback's rollouts load it with ``DiffusionPolicy.from_checkpoint`` and run the real
FlatDP in the real simulator. Its export can be told to fail on chosen ranks and rounds.
"""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.rollout import RolloutEvaluation

TINY_DP = dict(conditioning="none", horizon=8, image_size=32, resnet_width=8, image_pool="avg", d_model=32, n_heads=2,
               pool_blocks=1, unet_channels=(16, 32, 64), step_embed_dim=16)


class TinyModule(L.LightningModule):
    def __init__(self, fail_export: tuple = ()):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.fail_export = set(fail_export)  # (rank, round) pairs whose export raises
        self.exports = 0

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4)

    def export_policy(self, path) -> Path:
        from lightning_modules.dp.model import DiffusionPolicyModel
        from lightning_modules.dp.module import POLICY_FORMAT

        self.exports += 1
        if (self.global_rank, self.exports) in self.fail_export:
            raise RuntimeError(f"export failed on purpose (rank {self.global_rank}, round {self.exports})")
        torch.manual_seed(0)
        model = DiffusionPolicyModel(**TINY_DP)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": POLICY_FORMAT, "version": 1, "model": TINY_DP, "n_action_steps": 4,
                    "state_dict": model.state_dict()}, path)
        return path


class DumpHistory(L.Callback):
    """Writes each rank's rollout history to ``<dir>/rank<r>.json`` (ddp_spawn processes)."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_fit_end(self, trainer, pl_module):
        rollout = next(c for c in trainer.callbacks if isinstance(c, RolloutEvaluation))
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(rollout.history))


def trainer_for(tmp_path, callbacks, max_epochs=2, **kwargs):
    return L.Trainer(max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=1,
                     logger=TensorBoardLogger(str(tmp_path), name="", version="tb"), enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)


def test_oracle_rollouts_every_second_validation_with_scalars_and_videos(tmp_path):
    rollout = RolloutEvaluation("Topple", policy="oracle", episodes=2, every_n_val_epochs=2, image_size=32)
    trainer = trainer_for(tmp_path, [rollout], max_epochs=3)
    trainer.fit(TinyModule())
    assert rollout.val_runs == 3  # the sanity check is not counted
    assert [step for step, _ in rollout.history] == [4]  # after the 2nd validation (2 batches per epoch)
    metrics = rollout.history[0][1]
    assert metrics["rollout/success/Topple"] == 1.0 and metrics["rollout/success/mean"] == 1.0
    assert metrics["rollout/episodes"] == 2 and metrics["rollout/failed_ranks"] == 0
    assert trainer.callback_metrics["rollout/success/Topple"] == 1.0
    assert (tmp_path / "tb" / "rollouts" / "step4" / "Topple_seed100000_success.mp4").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("rollout/success/mean")] == [1.0]
    assert acc.Images("rollout/video/Topple/seed100000")[0].encoded_image_string[:6] == b"GIF89a"


def test_failed_round_is_logged_and_training_continues_with_the_next_round(tmp_path):
    rollout = RolloutEvaluation("Topple", policy="flat_dp", episodes=2, image_size=32, max_steps=6,
                                video_episodes=0, envs_per_worker=2)  # both episodes in one batch
    trainer = trainer_for(tmp_path, [rollout], max_epochs=2)
    trainer.fit(TinyModule(fail_export={(0, 1)}))
    (step1, first), (step2, second) = rollout.history
    assert first == {"rollout/failed_ranks": 1.0}  # no success values from a failed round
    assert second["rollout/failed_ranks"] == 0 and second["rollout/episodes"] == 2
    assert second["rollout/success/Topple"] == 0.0  # a random tiny DP does not topple anything
    assert second["rollout/episode_length/mean"] == 6
    assert trainer.current_epoch == 2 and (tmp_path / "tb" / "rollouts" / "policy_rank0.pt").exists()


def test_a_module_without_export_policy_is_refused_before_training(tmp_path):
    class NoExport(TinyModule):
        export_policy = None

    with pytest.raises(TypeError, match="export_policy"):
        trainer_for(tmp_path, [RolloutEvaluation("Topple", policy="flat_dp", image_size=32)]).fit(NoExport())
    with pytest.raises(ValueError, match="unknown rollout policy"):
        RolloutEvaluation("Topple", policy="teleport")


@pytest.mark.slow
def test_ddp_ranks_log_the_same_all_reduced_numbers_and_survive_a_failing_rank(tmp_path):
    rollout = RolloutEvaluation("Topple", policy="flat_dp", episodes=3, image_size=32, max_steps=6,
                                video_episodes=1)
    trainer = trainer_for(tmp_path, [rollout, DumpHistory(tmp_path)], max_epochs=2, accelerator="cpu", devices=2,
                          strategy="ddp_spawn")
    trainer.fit(TinyModule(fail_export={(1, 1)}))  # rank 1 fails in the first round only
    histories = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert histories[0] == histories[1]  # every rank logged the same numbers
    (_, first), (_, second) = histories[0]
    assert first == {"rollout/failed_ranks": 1.0}
    # 3 seeds, uneven shards (2 + 1 episodes), summed over the ranks
    assert second["rollout/episodes"] == 3 and second["rollout/failed_ranks"] == 0
    assert second["rollout/episode_length/mean"] == 6
    assert list((tmp_path / "tb" / "rollouts").glob("step*/Topple_seed100000_*.mp4"))  # videos from rank 0
