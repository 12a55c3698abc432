"""Inference-time diffusion policy: one observation + instruction -> an action chunk.

Loads from a Lightning checkpoint of ``make train-dp`` or from a file written by
``DiffusionPolicyModule.export_policy``; either holds the model config, the normalisation
statistics and the EMA weights, so no training config is needed. Sampling is DDIM with the
model's ``num_inference_steps`` (paper: 10).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from configs.errors import CheckpointError
from lightning_modules.dp.model import DiffusionPolicyModel
from lightning_modules.dp.module import POLICY_FORMAT
from lightning_modules.dp.state import BASE_TARGET_FEATURES, state_sample
from lightning_modules.training import read_checkpoint


class DiffusionPolicy:
    """``execution``: the checkpoint's test-time defaults for the policies that run this DP
    (``line_end_check``, ``max_line_steps``, ``snap_holds``: configs/dp.yaml ``execution``;
    make eval's ``policy_options`` override them); absent keys: the policies' own defaults."""

    def __init__(self, model: DiffusionPolicyModel, n_action_steps: int = 8, device: str = "cpu", seed: int = 0,
                 execution: dict | None = None):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.n_action_steps = int(n_action_steps)
        self.execution = dict(execution or {})
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.held_targets: dict = {}  # this episode's code-target estimates (model.keypoint_target_hold)

    @property
    def horizon(self) -> int:
        return self.model.horizon

    @property
    def conditioning(self) -> str:
        return self.model.conditioning

    @property
    def observation(self) -> str:
        """``rgb`` (cameras) or ``state`` (object poses: ``predict_action_chunk`` needs ``scene``)."""
        return self.model.observation

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", model_overrides: dict | None = None,
                        **overrides) -> "DiffusionPolicy":
        """From a ``.ckpt`` (EMA weights) or an exported policy file; ``overrides``: constructor args;
        ``model_overrides``: model settings that change no weight, replacing the checkpoint's
        (e.g. ``keypoint_peak_window``)."""
        path = Path(path)
        blob = read_checkpoint(path, "diffusion-policy checkpoint (make train-dp: <out>/policy.pt or a .ckpt)")
        if blob.get("format") == POLICY_FORMAT:
            config, n_steps, state = blob["model"], blob["n_action_steps"], blob["state_dict"]
            execution = blob.get("execution")
        elif "hyper_parameters" in blob and "ema" in blob:
            hp = blob["hyper_parameters"]
            config, n_steps, execution = dict(hp["model"]), hp.get("n_action_steps", 8), hp.get("execution")
            state = {k[len("model."):]: v for k, v in blob["state_dict"].items() if k.startswith("model.")}
        else:
            raise CheckpointError(f"{path} is neither a train-dp checkpoint nor an exported policy "
                                  f"(is it a VLM's? those go to VLM=...)")
        if "image_pool" not in config:  # older checkpoints: read the pooling off the weights
            config["image_pool"] = "spatial_softmax" if any(".keypoints." in k for k in state) else "avg"
        if "obs_skip" not in config:  # ... and whether FiLM sees the observation tokens
            film_in = state["unet.mid.0.film.1.weight"].shape[1] - state["unet.step_embed.3.weight"].shape[0]
            config["obs_skip"] = film_in != config.get("n_queries", 1) * state["obs_type"].shape[1]
        if "target_object_offset" not in config and "state.targets.0.weight" in state:  # state DPs saved before the option
            config["target_object_offset"] = state["state.targets.0.weight"].shape[1] != BASE_TARGET_FEATURES
        model = DiffusionPolicyModel(**{**config, **(model_overrides or {})})
        if "ema" in blob:  # a Lightning checkpoint: the EMA shadow parameters replace the raw ones
            state.update(zip([n for n, _ in model.named_parameters()], blob["ema"]["shadow_params"]))
        model.load_state_dict(state)
        return cls(model, **{"n_action_steps": n_steps, "device": device, "execution": execution, **overrides})

    def reset(self) -> None:
        """New episode: restart the sampling noise stream (rollouts are reproducible per seed) and
        forget the held code targets."""
        self.generator = torch.Generator().manual_seed(self.seed)
        self.held_targets = {}

    def batch(self, observation: dict, instruction: str, cache_info: str, scene: dict | None = None) -> dict:
        """One observation (``envs.tabletop.observation_arrays``) as a batch of one.

        ``scene`` (state observation only): ``names`` (N,) and ``sizes`` (N, 2) height/radius of
        the objects in the order of ``observation["object_pose"]``, and ``pose_dict`` (key -> (3,)).
        """
        def rgb(x):
            return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].to(self.device)

        proprio = np.concatenate([observation["qpos"], observation["qvel"], observation["tcp_pose"]])
        batch = {"proprio": torch.as_tensor(proprio, dtype=torch.float32)[None].to(self.device),
                 "suction": torch.as_tensor(observation["suction"], dtype=torch.float32)[None].to(self.device),
                 # ``task`` conditioning reads the prompt; the code modes read instruction + cache.
                 "instruction": [instruction], "cache_info": [cache_info], "prompt": [instruction],
                 "held_targets": [self.held_targets]}
        if self.observation == "state":
            if scene is None:
                raise ValueError("a state-observation diffusion policy needs the scene's objects (scene=...)")
            sample = state_sample(scene["names"], scene["sizes"], observation["object_pose"], scene["pose_dict"])
            batch.update({k: [v] if isinstance(v, str) else v[None].to(self.device) for k, v in sample.items()})
        else:
            batch.update(base_rgb=rgb(observation["base_rgb"]), wrist_rgb=rgb(observation["wrist_rgb"]))
        return batch

    @torch.no_grad()
    def predict_action_chunk(self, observation: dict, instruction: str = "", cache_info: str = "",
                             scene: dict | None = None) -> np.ndarray:
        """(horizon, 7) float32 actions; for ``task`` conditioning pass the prompt as instruction.
        ``scene``: see :meth:`batch` (state observation only)."""
        chunk = self.model.sample(self.batch(observation, instruction, cache_info, scene), generator=self.generator)
        return chunk[0].cpu().numpy().astype(np.float32)

    def fork(self) -> "DiffusionPolicy":
        """A policy for another episode on the same network (shared weights, its own noise
        stream), e.g. one per environment of a batch (:meth:`predict_many`)."""
        return DiffusionPolicy(self.model, n_action_steps=self.n_action_steps, device=str(self.device), seed=self.seed,
                               execution=self.execution)

    @staticmethod
    @torch.no_grad()
    def predict_many(policies: list["DiffusionPolicy"], observations: list[dict], instructions: list[str],
                     cache_infos: list[str], scenes: list[dict | None]) -> list[np.ndarray]:
        """One chunk per policy as one batch: ``(horizon, 7)`` float32 each. ``policies`` share
        one network (:meth:`fork`); each row's initial noise comes from its own policy's
        generator, drawn as :meth:`predict_action_chunk` draws it, so a row gets the chunk it
        would get alone up to float rounding (batched matrix products, text padding). DDIM with
        eta = 0 (the sampler of ``model.sample``) draws no other noise."""
        first = policies[0]
        model = first.model
        parts = [p.batch(o, i, c, s) for p, o, i, c, s in zip(policies, observations, instructions, cache_infos, scenes)]
        batch = {k: (sum((b[k] for b in parts), []) if isinstance(parts[0][k], list)
                     else torch.cat([b[k] for b in parts])) for k in parts[0]}
        cond = model.condition(batch)
        scheduler = model.ddim
        scheduler.set_timesteps(model.num_inference_steps)
        x = torch.cat([torch.randn((1, model.horizon, 7), generator=p.generator, device="cpu")
                       for p in policies]).to(cond.device)
        for t in scheduler.timesteps:
            eps = model.unet(x, t.expand(x.shape[0]).to(cond.device), cond)
            x = scheduler.step(eps, t, x).prev_sample
        chunks = model.normalizer.unnormalize_actions(x).cpu().numpy().astype(np.float32)
        return list(chunks)
