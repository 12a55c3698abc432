"""The diffusion policy network (paper 4.3, Figure 3, Appendix E.2).

Observation tokens, each of width ``d_model``:
  one per camera (a GroupNorm ResNet-18 per camera, trained from scratch), one for
  proprioception (qpos, qvel, tcp pose: 21 on our Panda; ``proprio_dim`` comes from the data), one
  for the suction state (2), and the frozen text encoder's token states of the instruction and of
  the cache info (encoded separately, each with its own learned type embedding).
Attention pooling: ``n_queries`` learned query tokens go through ``pool_blocks`` transformer
decoder blocks (self-attention among queries, cross-attention to the observation tokens with a
padding mask), giving the pooled vector (B, n_queries * d_model). With ``obs_skip`` (default)
the four observation tokens are also concatenated to it, as Diffusion Policy feeds its
observation features to FiLM: the conditioning vector is (B, (n_queries + 4) * d_model). Why:
without it the pooled vector barely depends on the images (measured: swapping the base and wrist
images of two scenes changed it by 3-4 %, the code tokens outnumber the 4 observation tokens),
and the cpu-preset DP then acts almost blind; the paper's text fixes only that the language
tokens are pooled.
A ConditionalUnet1D predicts the noise of the action chunk (B, horizon, 7) with FiLM from that
vector and the diffusion timestep. One observation step, no history (paper E.2).

With ``observation: state`` (not the paper's setting; see ``state.py``) the two camera tokens
are replaced by object-centric tokens (name embedding, pose, size, mention role) and tokens for
the positions that the instruction's ``pose_dict`` reads refer to; FiLM then sees proprio,
suction, the objects named first and second, and the two targets.

Object localisation loss (``aux_object_weight`` > 0, image DP only; not in the paper): a small
head on the pooled vector and the camera tokens predicts where the objects named first and
second in the instruction are, relative to the TCP (decimetres), and its MSE is added to the
diffusion loss with that weight. Its targets are the recorded object poses (``obs/object_pose``),
read in training only: the policy still acts from the images alone. Why: the image DP did not learn to find objects
within CPU hours (issue 11: 12.5 % DP+Oracle on L0 after 2.1 h) where a state DP, given the
positions, learns in minutes; this loss asks the image encoder for those positions directly
(privileged supervision in training, as in asymmetric actor-critic setups).

Named-object keypoints (``object_keypoint_weight`` > 0, image DP only; not in the paper; see
``keypoints.py``): the objects the line names in ``get_actor`` are searched for in the base
camera's stage-1 map by attention, taught by a cross-entropy to their recorded box centres; their
image and table positions become two more observation tokens (also fed to FiLM). With it,
``first_step_localisation_cm`` reports the keypoints' table positions. With ``keypoint_targets``
(``targets.py``) the ``pose_dict`` positions the line reads are estimated from the keypoints and
their assignment's code, taught by the recorded values: two more tokens.

Text-conditioned image encoders (``image_film``, not in the paper): the mean of each text's token
states (the instruction's and the cache info's: MiniLM's own sentence pooling), projected to
``d_model``, FiLM-modulates every ResNet block of both cameras (``networks.resnet``; RT-1 conditions
its image tower on the instruction the same way), so the spatial-softmax keypoints can follow the
objects the code line names instead of summarising every object in one token.

Batch keys: ``base_rgb``, ``wrist_rgb`` (B, 3, H, W) uint8 (``rgb``) or the state keys of
``state.state_sample`` (``state``); ``proprio`` (B, ``proprio_dim``: 21 for our data); ``suction``
(B, 2); for training ``actions`` (B, horizon, 7); and the strings the conditioning mode reads
(``instruction``, ``cache_info`` or ``prompt``; see ``processor.conditioning_texts``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from configs.errors import ConfigError

from ..diffusion import build_schedulers, loss_weights
from ..networks import ConditionalUnet1D, ResNet18GN
from .keypoints import NamedObjectKeypoints, named_objects
from .processor import Normalizer, check_conditioning, conditioning_texts, preprocess_images
from .state import MAX_ROLES, MAX_TARGETS, N_SKIP, POS_SCALE, StateTokens, rests_on_table, roles_of
from .targets import CodeTargets, anchor_moved
from .text import FrozenTextEncoder

CAMERAS = ("base_rgb", "wrist_rgb")
OBSERVATIONS = ("rgb", "state")
TCP_POSITION = slice(14, 17)  # in proprio: qpos (7), qvel (7), tcp_pose (7)
PROPRIO_DIM, SUCTION_DIM, ACTION_DIM = 21, 2, 7  # PROPRIO_DIM: our Panda; ``proprio_dim`` sets another


class AttentionPooling(nn.Module):
    """Learned queries cross-attending over tokens (B, N, D) with ``pad`` (B, N) True = padding.

    The blocks are ``nn.TransformerDecoder``'s (pre-norm, ReLU feed-forward, a final LayerNorm):
    its parameters, initialisation and checkpoint keys. The cross-attention is computed here,
    equal to ``nn.MultiheadAttention``'s up to float rounding (tested), with the key and value
    projections moved from the N tokens onto the few queries. Why hand-written: with N around 100
    tokens (the code's text tokens) and one query, projecting every token to keys and values
    (and torch's packed-projection copies) was about half of a cpu-preset training step (profiled).
    """

    def __init__(self, d_model: int, n_heads: int, n_blocks: int, n_queries: int = 1):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, d_model) * 0.02)
        block = nn.TransformerDecoderLayer(d_model, n_heads, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(block, n_blocks, norm=nn.LayerNorm(d_model))

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = self.queries.expand(tokens.shape[0], -1, -1)
        for layer in self.blocks.layers:  # nn.TransformerDecoderLayer.forward with norm_first=True
            q = layer.norm1(x)
            x = x + layer.self_attn(q, q, q, need_weights=False)[0]
            x = x + cross_attention(layer.multihead_attn, layer.norm2(x), tokens, pad)
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        return self.blocks.norm(x).flatten(1)  # (B, n_queries * D)


def cross_attention(mha: nn.MultiheadAttention, x: torch.Tensor, tokens: torch.Tensor,
                    pad: torch.Tensor) -> torch.Tensor:
    """``mha(x, tokens, tokens, key_padding_mask=pad)[0]`` for queries x (B, Q, D) over tokens
    (B, N, D), computed with the key/value projections folded into the queries: a head's score
    q.(W_k t + b_k) is (W_k^T q).t plus a term equal for all tokens (it cancels in the softmax),
    and the attention-weighted sum of W_v t + b_v is W_v (sum of weights * t) + b_v."""
    b, n_q, d = x.shape
    h = mha.num_heads
    e = d // h
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, _, b_v = mha.in_proj_bias.chunk(3)
    q = F.linear(x, w_q, b_q).view(b, n_q, h, e) * e ** -0.5
    q_keys = torch.einsum("bqhe,hed->bqhd", q, w_k.view(h, e, d)).reshape(b, n_q * h, d)
    scores = torch.bmm(q_keys, tokens.transpose(1, 2))  # (B, Q*H, N)
    weights = scores.masked_fill(pad[:, None, :], float("-inf")).softmax(-1)
    mixed = torch.bmm(weights, tokens).view(b, n_q, h, d)  # attention-weighted tokens per head
    heads = torch.einsum("bqhd,hed->bqhe", mixed, w_v.view(h, e, d)) + b_v.view(h, e)
    return mha.out_proj(heads.reshape(b, n_q, d))


def reads_recorded_objects(model: dict) -> bool:
    """Whether a DP's ``model`` config reads the recorded objects (poses, boxes) in training, i.e.
    needs the datamodule's ``load_state``: the state observation, or a loss taught by them."""
    return (model.get("observation", "rgb") == "state" or model.get("aux_object_weight", 0.0) > 0
            or model.get("object_keypoint_weight", 0.0) > 0)


def reads_assignment_objects(model: dict) -> bool:
    """Whether a DP's ``model`` config reads where the objects were at each ``pose_dict``
    assignment (the dataset's ``pose_object_xy``): the code targets' teacher (``targets.py``)."""
    return bool(model.get("keypoint_targets", False)) and model.get("keypoint_target_teacher", 0.0) > 0


def _privileged_loss_on(option: str, weight: float, observation: str, conditioning: str) -> bool:
    """Whether a loss taught by the recorded objects (weight ``option``) is on; a ConfigError for
    a negative weight, or for a model whose text names no objects or that reads the poses itself."""
    if weight < 0:
        raise ConfigError(f"{option}={weight} must be >= 0 (0: off)")
    if weight > 0 and (observation != "rgb" or conditioning == "none"):
        raise ConfigError(f"{option} is for the image DP (observation rgb) with a conditioning text that names "
                          "objects; the state DP reads the object poses themselves")
    return weight > 0


class DiffusionPolicyModel(nn.Module):
    """Noise-prediction network + normaliser + schedules; ``loss`` for training, ``sample`` to act."""

    def __init__(self, *, conditioning: str = "code", observation: str = "rgb", horizon: int = 16, image_size: int = 64,
                 crop_ratio: float = 0.875, resnet_width: int = 16, image_pool: str = "spatial_softmax",
                 resnet_maxpool: bool = True,
                 obs_skip: bool = True, d_model: int = 128, n_heads: int = 4,
                 pool_blocks: int = 2, n_queries: int = 1, unet_channels=(64, 128, 256),
                 step_embed_dim: int = 64, text_encoder: str = "minilm", text_encoder_name: str | None = None,
                 text_max_length: int = 64, loss_weighting: str = "elbo_clipped", num_inference_steps: int = 10,
                 target_object_offset: bool = False, aux_object_weight: float = 0.0,
                 image_film: bool = False, object_keypoint_weight: float = 0.0,
                 keypoint_memory_names: bool = False, keypoint_table_resting_only: bool = False,
                 keypoint_peak_window: int = 0, keypoint_table_map: str = "learned", random_shift: bool = False,
                 keypoint_targets: bool = False, keypoint_target_hold: bool = False,
                 keypoint_target_teacher: float = 0.0, proprio_dim: int = PROPRIO_DIM):
        super().__init__()
        self.conditioning = check_conditioning(conditioning)
        if observation not in OBSERVATIONS:
            raise ConfigError(f"unknown observation {observation!r}; use one of {list(OBSERVATIONS)}")
        self.observation = observation
        self.horizon, self.image_size, self.num_inference_steps = horizon, image_size, num_inference_steps
        self.crop = max(8, round(image_size * crop_ratio))
        # random_shift (DrQ's augmentation; not in Diffusion Policy, which crops): pad by the
        # margin a crop would cut and crop the image size back out in training, and see the whole
        # image at test time, so objects at the image's edge stay in view (a centre crop of 56 of
        # 64 px cut off 3 % of the place tasks' objects at their first step; 12 % lay within 2 px of it)
        self.random_shift = bool(random_shift)
        self.shift_pad = (image_size - self.crop) // 2 if self.random_shift else 0
        if self.random_shift:
            self.crop = image_size
        stride = 32 if resnet_maxpool else 16
        if observation == "rgb" and image_pool == "spatial_softmax" and -(-self.crop // stride) < 2:
            raise ConfigError(f"image_pool spatial_softmax needs a feature map of at least 2x2 (crops of "
                             f"{stride + 1} px or more); the {self.crop} px crop leaves 1x1: use image_pool avg"
                             + (" or resnet_maxpool false" if resnet_maxpool else ""))
        # proprio = qpos, qvel, tcp_pose (7): its width comes from the data (train_dp.build: 21 for
        # our Panda, 29 for ClevrSkills' xArm6 + vacuum); checkpoints without it are 21 wide
        self.proprio_dim = int(proprio_dim)
        self.tcp_position = slice(self.proprio_dim - 7, self.proprio_dim - 4)
        self.normalizer = Normalizer(ACTION_DIM, self.proprio_dim)
        cameras = CAMERAS if observation == "rgb" else ()
        self.image_film = bool(image_film)
        if self.image_film and (observation != "rgb" or conditioning == "none"):
            raise ConfigError("image_film conditions the cameras' ResNets on the text: it needs observation rgb "
                              "and a conditioning with language (not 'none')")
        film_dim = d_model if self.image_film else 0
        self.cameras = nn.ModuleDict({c: ResNet18GN(d_model, width=resnet_width, pool=image_pool,
                                                        maxpool=resnet_maxpool, film_dim=film_dim)
                                      for c in cameras})
        self.proprio = nn.Linear(self.proprio_dim, d_model)
        self.suction = nn.Linear(SUCTION_DIM, d_model)
        n_obs = len(cameras) + 2
        self.obs_type = nn.Parameter(torch.randn(n_obs, d_model) * 0.02)
        self.text = None
        if conditioning != "none" or observation == "state":  # state: object names are embedded too
            self.text = FrozenTextEncoder(text_encoder, text_encoder_name, text_max_length)
        if conditioning != "none":
            self.lang_proj = nn.Linear(self.text.dim, d_model)
            self.lang_type = nn.Parameter(torch.randn(2, d_model) * 0.02)  # instruction, cache info
        if self.image_film:  # (instruction mean, cache-info mean) -> the ResNets' FiLM input
            self.film_text = nn.Sequential(nn.Linear(2 * self.text.dim, d_model), nn.Mish())
        self.state = (StateTokens(d_model, self.text.dim, target_object_offset)
                      if observation == "state" else None)
        self.object_keypoint_weight = float(object_keypoint_weight)
        self.keypoint_memory_names = bool(keypoint_memory_names)
        self.keypoint_table_resting_only = bool(keypoint_table_resting_only)
        self.keypoints = None
        if _privileged_loss_on("object_keypoint_weight", self.object_keypoint_weight, observation, conditioning):
            base = self.cameras["base_rgb"]
            self.keypoints = NamedObjectKeypoints(base.map_channels, base.map_strides, self.text.dim, d_model,
                                                  peak_window=keypoint_peak_window, table_map=keypoint_table_map)
        self.targets = None
        if keypoint_targets:
            if self.keypoints is None:
                raise ConfigError("keypoint_targets estimates positions from the named-object keypoints: it needs "
                                  "observation rgb, a code conditioning and object_keypoint_weight > 0")
            self.targets = CodeTargets(d_model)
        # test time only (no weights): each pose_dict estimate kept from its line's first chunk
        # (targets.py); the batch carries the episode's dict as ``held_targets``
        self.keypoint_target_hold = bool(keypoint_target_hold)
        # training only: target tokens from the recorded pose_dict value + N(0, this dm) (targets.py)
        self.keypoint_target_teacher = float(keypoint_target_teacher)
        for name, on in (("keypoint_target_hold", self.keypoint_target_hold),
                         ("keypoint_target_teacher", self.keypoint_target_teacher != 0)):
            if on and self.targets is None:
                raise ConfigError(f"{name} acts on the code targets: it needs keypoint_targets true")
        if self.keypoint_target_teacher < 0:
            raise ConfigError(f"keypoint_target_teacher={self.keypoint_target_teacher} must be >= 0 (dm of noise; 0: off)")
        self.pool = AttentionPooling(d_model, n_heads, pool_blocks, n_queries)
        self.obs_skip = bool(obs_skip)
        n_skip = (n_obs + (N_SKIP if self.state is not None else 0) + (MAX_ROLES if self.keypoints is not None else 0)
                  + (MAX_TARGETS if self.targets is not None else 0))
        cond_dim = (n_queries + (n_skip if self.obs_skip else 0)) * d_model
        self.unet = ConditionalUnet1D(ACTION_DIM, cond_dim, channels=tuple(unet_channels),
                                      step_embed_dim=step_embed_dim)
        self.aux_object_weight = float(aux_object_weight)
        self.aux_head = None
        if _privileged_loss_on("aux_object_weight", self.aux_object_weight, observation, conditioning):
            # reads the pooled vector (where the text says which objects) and the camera tokens
            # (a direct path into the image encoders, which the pooling may learn to bypass)
            self.aux_head = nn.Sequential(nn.Linear((n_queries + len(cameras)) * d_model, d_model), nn.Mish(),
                                          nn.Linear(d_model, MAX_ROLES * 3))
        self.last_losses: dict[str, torch.Tensor] = {}  # the auxiliary parts of the last ``loss`` (logging)
        self.last_localisation = None  # (head's positions, targets, named) of the last localisation loss
        self.ddpm, self.ddim = build_schedulers()
        self.register_buffer("loss_weights", loss_weights(self.ddpm, loss_weighting), persistent=False)

    # ---------------------------------------------------------------- conditioning
    def _images(self, rgb: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, crop, crop) float images and the crop's (row, column) offset in the resized image
        (with ``random_shift``: (B, 3, image_size, image_size), the offset in [-pad, pad])."""
        x = preprocess_images(rgb, self.image_size)
        c, s = self.crop, self.image_size
        if self.random_shift:  # a random shift of up to shift_pad px in training, none at test time
            p = self.shift_pad
            if not self.training or not p:
                return x, (0, 0)
            i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = F.pad(x, (p, p, p, p), mode="replicate")
            return x[..., i:i + s, j:j + s], (i - p, j - p)
        if c == s:
            return x, (0, 0)
        if self.training:  # random crop (Diffusion Policy), a fixed centre crop at test time
            i, j = torch.randint(0, s - c + 1, (2,)).tolist()
        else:
            i = j = (s - c) // 2
        return x[..., i:i + c, j:j + c], (i, j)

    def condition(self, batch: dict) -> torch.Tensor:
        """Observation + language tokens -> conditioning vector (B, cond_dim): the pooled
        (B, n_queries * d_model), then with ``obs_skip`` the observation tokens: 4 (rgb: cameras,
        proprio, suction; 6 with the named-object keypoints, 8 with their code targets) or
        2 + ``N_SKIP`` (state: proprio, suction, roles 1-2, targets 1-2)."""
        return self._condition(batch)[0]

    def _condition(self, batch: dict):
        """(conditioning vector, features of the localisation head, conditioning texts or None,
        the keypoints' output or None)."""
        proprio = batch["proprio"].float()
        texts = conditioning_texts(self.conditioning, batch)
        if self.text is not None:
            self.text.to(proprio.device)
        encoded = [self.text.encode(strings) for strings in texts] if texts is not None else []
        film = None
        if self.image_film:
            means = [(lang * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1) for lang, mask in encoded]
            film = self.film_text(torch.cat(means, 1))
        obs, kp = [], None
        for c in self.cameras:
            images, offset = self._images(batch[c])
            if c == "base_rgb" and self.keypoints is not None:
                feature, maps = self.cameras[c](images, film, maps=True)
                kp = self.keypoints(maps, offset, self.image_size, self.keypoint_names(texts),
                                    proprio[:, self.tcp_position], self.text)
            else:
                feature = self.cameras[c](images, film)
            obs.append(feature)
        obs += [self.proprio(self.normalizer.normalize_proprio(proprio)), self.suction(batch["suction"].float())]
        tokens = skip = torch.stack(obs, 1) + self.obs_type
        pad = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if kp is not None:
            tokens, pad = torch.cat([tokens, kp["tokens"]], 1), torch.cat([pad, ~kp["present"]], 1)
            skip = torch.cat([skip, kp["tokens"]], 1)
            if self.targets is not None:
                held = batch.get("held_targets") if self.keypoint_target_hold and not self.training else None
                teacher = ((batch["pose_keys"], batch["pose_values"], self.keypoint_target_teacher)
                           if self.training and self.keypoint_target_teacher and "pose_values" in batch else None)
                kp["targets"] = tg = self.targets(texts[0], texts[1], kp, proprio[:, self.tcp_position],
                                                  held, teacher)
                tokens, pad = torch.cat([tokens, tg["tokens"]], 1), torch.cat([pad, ~tg["present"]], 1)
                skip = torch.cat([skip, tg["tokens"]], 1)
        if self.state is not None:
            state, state_pad, state_skip = self.state(batch, None if texts is None else texts[0],
                                                      proprio[:, self.tcp_position], self.text)
            tokens, pad = torch.cat([tokens, state], 1), torch.cat([pad, state_pad], 1)
            skip = torch.cat([skip, state_skip], 1)
        if texts is not None:
            for kind, (lang, mask) in enumerate(encoded):
                tokens = torch.cat([tokens, self.lang_proj(lang) + self.lang_type[kind]], 1)
                pad = torch.cat([pad, ~mask], 1)
        pooled = self.pool(tokens, pad)
        cond = torch.cat([pooled, skip.flatten(1)], 1) if self.obs_skip else pooled
        features = torch.cat([pooled, *obs[: len(self.cameras)]], 1) if self.aux_head is not None else None
        return cond, features, texts, kp

    def object_localisation_loss(self, batch: dict, features: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """MSE of the head's positions (B, 2, 3) of the objects the instructions name first and
        second, relative to the TCP, in decimetres; over the named objects only (0 if none).
        ``features``: the pooled vector and the camera tokens (B, (n_queries + 2) * d_model).
        Needs the state keys ``object_pose``, ``object_mask`` and ``object_names`` in ``batch``."""
        if "object_pose" not in batch:
            raise KeyError("aux_object_weight needs the object poses in the batch (the datamodule's load_state)")
        pose, mask = batch["object_pose"].float(), batch["object_mask"].bool()
        tcp = batch["proprio"].float()[:, self.tcp_position]
        B, M = mask.shape
        names = [s.split("\n") if s else [] for s in batch["object_names"]]
        roles = roles_of(instructions, names, M, pose.device)
        # (B, MAX_ROLES, M): which object holds each role
        which = torch.stack([(roles == r) & mask for r in range(1, MAX_ROLES + 1)], 1).float()
        named = which.sum(-1) > 0
        target = which @ ((pose[..., :3] - tcp[:, None]) * POS_SCALE)
        pred = self.aux_head(features).view(B, MAX_ROLES, 3)
        self.last_localisation = (pred.detach(), target, named)
        err = ((pred - target) ** 2).mean(-1)
        return (err * named).sum() / named.sum().clamp_min(1)

    def first_step_localisation_cm(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Of the last ``object_localisation_loss`` batch, the rows at an episode's start (``t``: (B,)
        step indices, 0 there) whose line names an object: the xy error of the head's position of the
        first named object, and that object's xy distance from the TCP (the error of a head that
        always answers "under the TCP"), each (K,) in cm; None if there is no such row.

        Why: the loss averages over all steps, most of them near an object, where the wrist camera
        sees it and the distances are short; this tells whether the encoder finds the named object
        in the scene at the start (measured, README session 24: 6-8 cm where the object is 20 cm away)."""
        if self.last_localisation is None:
            return None
        pred, target, named = self.last_localisation
        rows = (t.to(named.device) == 0) & named[:, 0]
        if not rows.any():
            return None
        to_cm = 100.0 / POS_SCALE
        error = (pred[rows, 0, :2] - target[rows, 0, :2]).norm(dim=-1) * to_cm
        return error, target[rows, 0, :2].norm(dim=-1) * to_cm

    # ---------------------------------------------------------------- diffusion
    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Timestep-weighted epsilon MSE of one noisy sample per chunk (scalar), plus the object
        localisation loss times ``aux_object_weight`` when it is on (the parts: ``last_losses``).

        ``generator`` (CPU) fixes the noise and timesteps, e.g. for a comparable validation loss.
        """
        x0 = self.normalizer.normalize_actions(batch["actions"].float())
        cond, features, texts, kp = self._condition(batch)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = torch.randint(0, self.ddpm.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        noisy = self.ddpm.add_noise(x0, noise, t)
        per_sample = F.mse_loss(self.unet(noisy, t, cond), noise, reduction="none").mean((1, 2))
        loss = (self.loss_weights[t] * per_sample).mean()
        if self.aux_head is not None:
            aux = self.object_localisation_loss(batch, features, texts[0])
            self.last_losses["object_localisation"] = aux.detach()  # a tensor: no device sync here
            loss = loss + self.aux_object_weight * aux
        if kp is not None:
            heatmap, table = self.keypoint_losses(batch, kp)
            self.last_losses["keypoint_heatmap"] = heatmap.detach()
            self.last_losses["keypoint_table"] = table.detach()
            loss = loss + self.object_keypoint_weight * (heatmap + table)
            if self.targets is not None:
                # with the teacher, the head's target follows its anchor since the assignment (targets.py)
                moved = None
                if self.keypoint_target_teacher:
                    if "pose_object_xy" not in batch:
                        raise KeyError("keypoint_target_teacher needs pose_object_xy in the batch (the "
                                       "datamodule's assignment_objects)")
                    moved = anchor_moved(kp["targets"], batch["object_names"], batch["object_pose"],
                                         batch["pose_keys"], batch["pose_object_xy"])
                target = self.targets.loss(kp["targets"], batch["pose_keys"], batch["pose_values"], moved)
                self.last_losses["keypoint_target"] = target.detach()
                loss = loss + self.object_keypoint_weight * target
        return loss

    def keypoint_names(self, texts: tuple[list[str], list[str]]) -> list[list[str]]:
        """Each row's objects for the keypoints (``keypoints.named_objects`` of its instruction, with
        ``keypoint_memory_names`` or ``keypoint_targets`` also of its cache info)."""
        memory = texts[1] if self.keypoint_memory_names or self.targets is not None else [None] * len(texts[0])
        return [named_objects(line, info) for line, info in zip(texts[0], memory)]

    def keypoint_losses(self, batch: dict, kp: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The named-object keypoints' two losses (scalars): the attention's cross-entropy against
        the named objects' box centres (``object_bbox``, recorded pixels scaled to ``image_size``),
        and the MSE of their table positions (dm) against ``object_pose``; over the objects searched
        for (``kp['names']``) that are among the row's ``object_names`` (the MSE, with
        ``keypoint_table_resting_only``, only over those that rest on the table: ``rests_on_table``,
        neither lifted nor stacked). Also keeps the batch for
        ``first_step_localisation_cm`` (``last_localisation``)."""
        if "object_bbox" not in batch:
            raise KeyError("object_keypoint_weight needs the object boxes and poses in the batch (the datamodule's "
                           "load_state)")
        boxes, pose = batch["object_bbox"].float(), batch["object_pose"].float()
        B = boxes.shape[0]
        centres = torch.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2], -1)
        centres = centres * (self.image_size / batch["base_rgb"].shape[-1])
        which = torch.zeros(B, MAX_ROLES, pose.shape[1], device=pose.device)
        for b, objects in enumerate(batch["object_names"]):
            scene = objects.split("\n") if objects else []
            for r, name in enumerate(kp["names"][b]):
                if name in scene:
                    which[b, r, scene.index(name)] = 1.0
        known = which.sum(-1) > 0
        heatmap = self.keypoints.heatmap_loss(kp, which @ centres, known)
        target_xy = (which @ pose[..., :2]) * POS_SCALE
        on_table = known
        if self.keypoint_table_resting_only:  # the pixel-to-table map is a map of the table plane: teach it there
            resting = rests_on_table(pose[..., 2], batch["object_size"].float()[..., 0])  # (B, N)
            on_table = known & ((which @ resting.float().unsqueeze(-1)).squeeze(-1) > 0)
        table = (((kp["xy"] - target_xy) ** 2).mean(-1) * on_table).sum() / on_table.sum().clamp_min(1)
        tcp = batch["proprio"].float()[:, self.tcp_position] * POS_SCALE
        zero = torch.zeros(B, MAX_ROLES, 1, device=pose.device)
        rel = torch.cat([kp["xy"].detach() - tcp[:, None, :2], zero], -1)
        self.last_localisation = (rel, torch.cat([target_xy - tcp[:, None, :2], zero], -1), known)
        return heatmap, table

    @torch.no_grad()
    def sample(self, batch: dict, num_inference_steps: int | None = None, sampler: str = "ddim",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoise an action chunk: (B, horizon, 7) in the environment's action units.

        ``sampler``: ``ddim`` (default, ``num_inference_steps``, paper: 10) or ``ddpm`` (all 100).
        """
        cond = self.condition(batch)
        scheduler = self.ddim if sampler == "ddim" else self.ddpm
        steps = scheduler.config.num_train_timesteps if sampler == "ddpm" else \
            (num_inference_steps or self.num_inference_steps)
        scheduler.set_timesteps(steps)
        x = torch.randn((cond.shape[0], self.horizon, ACTION_DIM), generator=generator,
                        device="cpu").to(cond.device)
        for t in scheduler.timesteps:
            eps = self.unet(x, t.expand(x.shape[0]).to(cond.device), cond)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        return self.normalizer.unnormalize_actions(x)
