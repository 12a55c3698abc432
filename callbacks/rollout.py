"""Rollout evaluation during training: success curves of the policy being trained, in TensorBoard.

    from callbacks.rollout import RolloutEvaluation
    trainer = make_trainer(cfg, callbacks=[RolloutEvaluation("L0", policy="flat_dp", episodes=16,
                                                             every_n_val_epochs=5, image_size=64)])

Every ``every_n_val_epochs`` validation runs (sanity checks excluded) the callback

1. exports the module being trained (``pl_module.export_policy(path)``, EMA weights) into a file
   of its own per rank, for the DP policies (``flat_dp``, ``vlm_dp`` with a given ``vlm``
   checkpoint, ``dp_oracle``); ``oracle`` and ``vlm_oracle`` evaluate without the module;
2. runs :func:`policies.evaluator.evaluate` on this rank's shard of the fixed seeds
   (``seeds[rank::world_size]``), in-process (``workers=0``) or in spawned workers, with
   ``envs_per_worker`` environments per process whose VLM and DP calls go as batches;
3. all-reduces the per-task counts (successes, episodes, steps) and a failure flag over the
   ranks, so that every rank logs the same numbers: ``rollout/success/<task>``,
   ``rollout/success/mean``, ``rollout/episode_length/mean``, ``rollout/episodes`` and
   ``rollout/failed_ranks``;
4. on rank 0, adds the recorded videos to TensorBoard (animated GIFs under ``rollout/video``,
   see :mod:`callbacks.media`) and writes them as MP4 files to
   ``<log_dir>/rollouts/step<global_step>/``.

No deadlock under DDP: the shards differ by at most one episode per task and the only
collective is the single all-reduce after every rank has finished its shard. An exception on
a rank (export, checkpoint loading, simulator) is caught there and still joins the all-reduce
with its failure flag set; all ranks then log ``rollout/failed_ranks > 0`` (and no success
values for that round) and training continues.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from configs.errors import ConfigError
from policies.evaluator import DEFAULT_SEED_START, evaluate, evaluation_seeds, success_metrics
from policies.spec import KINDS, PolicySpec


class RolloutEvaluation(L.Callback):
    """See the module docstring.

    ``tasks``: names or a selection ("L0", "L0+L1"). ``policy``: a kind of
    :mod:`policies.spec`. ``vlm``: VLM checkpoint for ``vlm_dp`` / ``vlm_oracle``. ``options``:
    policy options (``n_action_steps``, ``horizon``, ``regenerate_on_keystep``, ``device``:
    default the module's device). ``image_size`` must match the policy's training images.
    ``envs_per_worker``: environments per evaluating process (``make eval ENVS_PER_WORKER=``).
    """

    def __init__(self, tasks="L0", *, policy: str = "flat_dp", vlm: str | None = None, episodes: int = 16,
                 every_n_val_epochs: int = 1, seed_start: int = DEFAULT_SEED_START, workers: int = 0,
                 envs_per_worker: int = 1, image_size: int = 128, backend: str = "auto", max_steps: int | None = None,
                 video_episodes: int = 1, options: dict | None = None, fps: int = 20):
        from envs import resolve_tasks

        if policy not in KINDS:
            raise ConfigError(f"unknown rollout policy {policy!r}; policies: {sorted(KINDS)}")
        if every_n_val_epochs < 1 or episodes < 1 or envs_per_worker < 1:
            raise ConfigError("every_n_val_epochs, episodes and envs_per_worker must be >= 1")
        self.tasks = resolve_tasks(tasks)
        self.kind = policy
        self.vlm = vlm
        self.seeds = evaluation_seeds(episodes, seed_start)
        self.every = int(every_n_val_epochs)
        self.workers, self.image_size, self.backend = int(workers), int(image_size), backend
        self.envs_per_worker = int(envs_per_worker)
        self.max_steps, self.video_episodes, self.fps = max_steps, int(video_episodes), int(fps)
        self.options = dict(options or {})
        self.needs_dp = KINDS[policy][0]
        PolicySpec(policy, vlm=vlm, options=self.options).validate(dp_later=True)
        self.val_runs = 0
        self.last_metrics: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []  # (global step, metrics) per round
        self.last_error = ""  # this rank's exception of the last round, if any

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.needs_dp and not callable(getattr(pl_module, "export_policy", None)):
            raise TypeError(f"rollout policy {self.kind} evaluates the module being trained, but "
                            f"{type(pl_module).__name__} has no export_policy(path)")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.val_runs += 1
        if self.val_runs % self.every == 0:
            self.run(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"val_runs": self.val_runs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.val_runs = int(state_dict.get("val_runs", 0))

    # ---------------------------------------------------------------- one round
    def run(self, trainer, pl_module) -> dict[str, float]:
        """Evaluate this rank's shard, all-reduce, log; returns the logged metrics (same on all ranks)."""
        counts = np.zeros((len(self.tasks), 3))
        result, self.last_error = None, ""
        # trainer.log_dir is a broadcast (a collective): read it here, on every rank, in step
        self.folder = Path(trainer.log_dir or trainer.default_root_dir) / "rollouts"
        try:
            # Lightning validates under inference_mode; policies are built and run outside it,
            # so nothing created here (e.g. cached text encoders) is an inference tensor later.
            with torch.inference_mode(False), torch.no_grad():
                result = self._evaluate_shard(trainer, pl_module)
            counts = result.counts()
        except Exception as e:  # noqa: BLE001: any failure must still reach the all-reduce
            self.last_error = f"{type(e).__name__}: {e}"
            print(f"[rank {trainer.global_rank}] rollout evaluation failed: {self.last_error}\n"
                  f"{traceback.format_exc()}", flush=True)
        flat = np.append(counts.ravel(), 1.0 if self.last_error else 0.0)
        total = trainer.strategy.reduce(torch.tensor(flat, dtype=torch.float32, device=pl_module.device),
                                        reduce_op="sum")
        total = total.detach().cpu().double().numpy()
        failed = int(round(total[-1]))
        metrics = {"rollout/failed_ranks": float(failed)}
        if failed == 0:
            metrics.update(success_metrics(self.tasks, total[:-1].reshape(len(self.tasks), 3)))
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
        self.last_metrics = metrics
        self.history.append((trainer.global_step, metrics))
        if failed:
            rank_zero_warn(f"rollout evaluation failed on {failed} rank(s) at step {trainer.global_step}; "
                           "no success values logged this round")
        else:
            rank_zero_info("rollout " + "  ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in metrics.items()
                                                  if k.startswith("rollout/success/")))
        if trainer.is_global_zero and result is not None and result.videos:
            self._log_videos(trainer, result.videos)
        return metrics

    def _evaluate_shard(self, trainer, pl_module):
        options = dict(self.options)
        dp = None
        if self.needs_dp:
            options.setdefault("device", str(pl_module.device))
            dp = pl_module.export_policy(self.folder / f"policy_rank{trainer.global_rank}.pt")
        spec = PolicySpec(self.kind, dp=str(dp) if dp else None, vlm=self.vlm, options=options)
        return evaluate(spec, self.tasks, seeds=self.seeds, workers=self.workers,
                        envs_per_worker=self.envs_per_worker, image_size=self.image_size,
                        backend=self.backend, max_steps=self.max_steps, video_episodes=self.video_episodes,
                        rank=trainer.global_rank, world_size=trainer.world_size)

    def _log_videos(self, trainer, videos) -> None:
        from .media import log_videos

        writer = None
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "_get_file_writer"):  # torch SummaryWriter (TensorBoardLogger)
                writer = experiment
        try:
            log_videos(videos, self.folder / f"step{trainer.global_step}", writer, step=trainer.global_step,
                       fps=self.fps)
        except Exception as e:  # noqa: BLE001: rank 0 only, no collective involved; keep training
            rank_zero_warn(f"could not write rollout videos: {type(e).__name__}: {e}")
