"""One ClevrSkills trajectory -> one episode file of our schema (``datamodules/schema.py``).

What goes where (README, "ClevrSkills data"):

* ``image/base_camera/rgb.mp4`` -> ``obs/base_rgb``, ``image/hand_camera/rgb.mp4`` -> ``obs/wrist_rgb``:
  the first T of the T + 1 frames (the observation before each action), made square
  (``aspect``: ``crop`` takes the centre square, ``pad`` adds black borders; ClevrSkills' cameras
  are square, 256 x 256, so both leave them as they are) and resized to ``image_size`` with
  antialiased bilinear filtering (as the DP resizes its inputs).
* ``agent/qpos``, ``agent/qvel`` -> ``obs/qpos``, ``obs/qvel`` (T, Q): the xArm6's 6 joints and its
  5 vacuum-cup joints, Q = 11; ``agent/ee_pose`` -> ``obs/tcp_pose`` (T, 7); ``agent/vacuum_on``,
  ``agent/vacuum_grasping`` -> ``obs/suction`` (T, 2). The episode attributes record the robot and
  the widths (``robot``, ``qpos_dim``, ``arm_joints``, ``proprio_dim``).
* ``actions.npy`` -> ``actions`` as they are; ``success.npy`` -> ``success``.
* objects: one per ``extra/actor_mesh_bbox/base_camera/<texture> <shape>_<id>.npy``, in id order:
  ``objects/name`` "<texture> <shape>", ``objects/id`` the actor id, ``objects/shape`` the last word,
  ``objects/colour`` the texture. ``objects/height`` and ``objects/radius`` are estimates (ClevrSkills
  records no sizes): twice the lowest centre height over the episode, and half the box width
  back-projected at the object's depth. ``obs/object_pose`` from ``extra/actors.npy``.
* ``obs/bboxes`` (T, N, 4): the base-camera boxes mapped like the image; an object that the
  camera does not see (``actor_is_visible`` 0, or no box) gets ``grounding.NOT_VISIBLE`` (-1) x 4.
* labels: ``labels/oracle`` is the ``level`` asked for, the other level is ``labels/clevrskills_<other>``
  (``labels.py``); the coarse set carries ``notation = COARSE_NOTATION``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import schema
from ..grounding import NOT_VISIBLE
from .labels import LabelMappingError, Labels, coarse_labels, fine_labels
from .source import (CAMERAS, KEYSTEP_TOKEN, Trajectory, TrajectoryError, clevrskills_task, decode_video,
                     load_trajectory, natural_prompt, source_seed)

LEVELS = ("fine", "coarse")
ASPECTS = ("crop", "pad")
COARSE_NOTATION = "clevrskills-llava"  # labels/<set>.attrs["notation"] of coarse label sets
ROBOTS = {11: ("xarm6_vacuum", 6)}  # qpos width -> (robot, arm joints): ClevrSkills' default robot


@dataclass(frozen=True)
class Settings:
    """What an import writes (fixed for an output folder): label level, image size and aspect
    handling, a forced task name (or None) and ClevrSkills' task names -> ours."""

    level: str = "fine"
    image_size: int = 128
    aspect: str = "crop"
    task: str | None = None
    task_names: tuple = ()  # ((clevrskills name, our name), ...)

    def our_task(self, clevrskills_name: str) -> str:
        return dict(self.task_names).get(clevrskills_name, clevrskills_name)


@dataclass
class ImportedEpisode:
    """What ``schema.write_episode`` reads of an episode."""

    task: str
    seed: int
    prompt: str
    success: bool
    actions: np.ndarray

    def __len__(self) -> int:
        return len(self.actions)


@dataclass(frozen=True)
class ImportedObject:
    name: str
    shape: str
    colour: str
    height: float
    radius: float


# --------------------------------------------------------------------------- images and boxes
def square_transform(width: int, height: int, aspect: str) -> tuple[int, int, int]:
    """(x offset, y offset, side) of the square taken from a width x height image: the centre
    square (``crop``) or the image centred in a square of its longer side (``pad``, negative offsets)."""
    if aspect == "crop":
        side = min(width, height)
    elif aspect == "pad":
        side = max(width, height)
    else:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    return (width - side) // 2, (height - side) // 2, side


def fit_images(frames: np.ndarray, size: int, aspect: str) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8: made square (``square_transform``), then
    resized with antialiased bilinear filtering (no resize when the square is already ``size``)."""
    T, H, W, _ = frames.shape
    ox, oy, side = square_transform(W, H, aspect)
    if ox >= 0 and oy >= 0:
        sq = frames[:, oy:oy + side, ox:ox + side]
    else:
        sq = np.zeros((T, side, side, 3), np.uint8)
        sq[:, -oy:-oy + H, -ox:-ox + W] = frames
    if side == size:
        return np.ascontiguousarray(sq)
    # uint8 in channels-last memory: torch's fast antialiased path (within 1 of the float result)
    x = torch.from_numpy(np.ascontiguousarray(sq)).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def fit_boxes(boxes: np.ndarray, visible: np.ndarray, width: int, height: int, size: int, aspect: str) -> np.ndarray:
    """ClevrSkills boxes (T, 2, 3) ``[[x0, y0, 1], [x1, y1, 1]]`` in source pixels -> (T, 4)
    ``x0, y0, x1, y1`` in the stored image's pixels (mapped as ``fit_images`` maps the image,
    clipped to it); not visible, no box or cropped away -> ``NOT_VISIBLE`` x 4."""
    ox, oy, side = square_transform(width, height, aspect)
    scale = size / side
    b = boxes[:, :, :2].astype(np.float64)
    out = np.stack([(b[:, 0, 0] - ox) * scale, (b[:, 0, 1] - oy) * scale,
                    (b[:, 1, 0] - ox) * scale, (b[:, 1, 1] - oy) * scale], 1)
    out = np.clip(out, 0, size)
    none = (~visible.astype(bool)) | (boxes[:, 1, 0] < 0) | (out[:, 2] <= out[:, 0]) | (out[:, 3] <= out[:, 1])
    out[none] = NOT_VISIBLE
    return out.astype(np.float32)


# --------------------------------------------------------------------------- objects
def actor_order(traj: Trajectory) -> list[int]:
    """For each object (id order) its block in ``extra/actors.npy`` (the task's actor order): matched
    by projecting the blocks' positions into the base camera onto the box centres, nearest first;
    id order when the camera parameters are missing."""
    n = len(traj.actors)
    if traj.intrinsic is None or traj.extrinsic is None:
        return list(range(n))
    pos = traj.actor_states[0].reshape(n, 13)[:, :3]
    cam = (traj.extrinsic[:3, :3] @ pos.T + traj.extrinsic[:3, 3:4]).T
    pix = (traj.intrinsic @ cam.T).T
    pix = pix[:, :2] / np.maximum(pix[:, 2:3], 1e-6)
    centres = np.array([traj.bboxes[a][0, :, :2].mean(0) for a in traj.actors])
    seen = np.array([traj.visible[a][0] and traj.bboxes[a][0, 1, 0] >= 0 for a in traj.actors])
    cost = np.linalg.norm(centres[:, None] - pix[None], axis=2)
    order: list[int | None] = [None] * n
    free = set(range(n))
    for i, j in sorted(((i, j) for i in range(n) if seen[i] for j in range(n)), key=lambda ij: cost[ij]):
        if order[i] is None and j in free:
            order[i] = j
            free.discard(j)
    for i in range(n):  # objects the camera does not see: the remaining blocks, in order
        if order[i] is None:
            order[i] = i if i in free else min(free)
            free.discard(order[i])
    return order


def objects_of(traj: Trajectory, order: list[int]) -> tuple[list[ImportedObject], np.ndarray]:
    """The object table and ``obs/object_pose`` (T, N, 7) (position, wxyz quaternion)."""
    T, n = len(traj), len(traj.actors)
    states = traj.actor_states.reshape(len(traj.actor_states), n, 13)[:, order]
    poses = states[:T, :, :7].astype(np.float32)
    objects = []
    for i, (name, aid) in enumerate(traj.actors):
        height = float(np.clip(2 * states[:, i, 2].min(), 0.01, 0.3))
        radius = height / 2
        if traj.intrinsic is not None and traj.extrinsic is not None:
            depth = (traj.extrinsic[:3, :3] @ states[:, i, :3].T + traj.extrinsic[:3, 3:4])[2]
            box = traj.bboxes[(name, aid)]
            k = np.flatnonzero(traj.visible[(name, aid)][:len(box)] & (box[:, 1, 0] >= 0) & (depth[:len(box)] > 0))
            if len(k):
                widths = (box[k, 1, 0] - box[k, 0, 0]) * depth[k] / traj.intrinsic[0, 0]
                radius = float(np.clip(np.median(widths) / 2, 0.005, 0.2))
        texture = traj.textures.get(f"{name}_{aid}", [None])[0]
        words = name.split()
        objects.append(ImportedObject(name, words[-1], str(texture or " ".join(words[:-1])), height, radius))
    return objects, poses


# --------------------------------------------------------------------------- one trajectory
def episode_task(traj: Trajectory, settings: Settings) -> tuple[str, str]:
    """(our task name, ClevrSkills' task name) of a trajectory."""
    if settings.task:
        return settings.task, settings.task
    name = clevrskills_task(traj.prompts)
    if name is None:
        shown = [re.sub(r"\{[^}]*\}", "{x}", p) for p in traj.prompts[:1]]  # without names: reasons are counted
        raise TrajectoryError(f"no known ClevrSkills task prompt ({shown}); import such a folder on its own "
                              f"with task=<Name>")
    return settings.our_task(name), name


@dataclass
class Converted:
    """One trajectory in our schema's terms, ready for :func:`write`."""

    episode: ImportedEpisode
    obs: dict                 # observation arrays (T, ...) by schema key
    success: np.ndarray       # (T,) bool
    main: Labels              # labels/oracle: the level asked for
    other: Labels             # labels/clevrskills_<other level>
    objects: list             # ImportedObject per object, in id order
    ids: list                 # ClevrSkills actor ids
    attrs: dict               # episode attributes (robot, widths, source)
    level: str


def convert(path, seed: int, rel: str, settings: Settings) -> Converted:
    """Read, label and convert one trajectory; raises :class:`TrajectoryError` with the reason."""
    traj = load_trajectory(path)
    T = len(traj)
    if not traj.success.any():
        raise TrajectoryError("never solved (success.npy holds no True)")
    task, cs_task = episode_task(traj, settings)
    prompts = [natural_prompt(p, traj.textures) for p in traj.prompts if KEYSTEP_TOKEN not in p]
    if not prompts:
        raise TrajectoryError("every prompt needs key-step images ({ks:...}), which our prompt format cannot hold")
    try:
        fine = fine_labels(traj.trace, traj.success)
        coarse = coarse_labels(traj.trace, traj.success, traj.prompts[0] if traj.prompts else "")
    except LabelMappingError as e:
        raise TrajectoryError(str(e)) from None
    objects, object_pose = objects_of(traj, actor_order(traj))
    size, aspect = settings.image_size, settings.aspect
    obs = {}
    W = H = None
    for key, camera in CAMERAS.items():  # the expensive part last: a bad trajectory fails fast
        frames = decode_video(Path(path) / "image" / camera / "rgb.mp4", T + 1)[:T]
        if key == "base_rgb":
            H, W = frames.shape[1:3]
        obs[key] = fit_images(frames, size, aspect)
    obs["bboxes"] = np.stack([fit_boxes(traj.bboxes[a][:T], traj.visible[a][:T], W, H, size, aspect)
                              for a in traj.actors], 1)
    obs["object_pose"] = object_pose
    obs["qpos"], obs["qvel"], obs["tcp_pose"] = traj.qpos[:T], traj.qvel[:T], traj.ee_pose[:T]
    obs["suction"] = np.stack([traj.vacuum_on[:T], traj.vacuum_grasping[:T]], 1).astype(np.float32)
    Q, Qv = traj.qpos.shape[1], traj.qvel.shape[1]
    robot, arm = ROBOTS.get(Q, (f"unknown ({Q} joints)", Q))
    s_seed, variant = source_seed(rel)
    attrs = dict(robot=robot, qpos_dim=Q, qvel_dim=Qv, arm_joints=arm, proprio_dim=Q + Qv + 7,
                 source_format="clevrskills", source_path=rel, source_seed=s_seed, source_variant=variant,
                 clevrskills_task=cs_task, prompts=json.dumps(prompts),
                 control_mode=str(traj.ep_info.get("control_mode", "")), source_image_size=(W, H),
                 image_aspect=aspect, label_level=settings.level, bbox_not_visible=NOT_VISIBLE)
    main, other = (fine, coarse) if settings.level == "fine" else (coarse, fine)
    episode = ImportedEpisode(task, seed, prompts[0], True, traj.actions.astype(np.float32))
    return Converted(episode, obs, traj.success.copy(), main, other, objects, [aid for _, aid in traj.actors],
                     attrs, settings.level)


def write(path: Path, c: Converted) -> None:
    """Atomically write the episode file (``schema.write_episode`` plus the importer's extras:
    attributes, ``objects/id``, the other level's label set)."""
    other_level = "coarse" if c.level == "fine" else "fine"

    def extra(g):
        g.attrs.update(c.attrs)
        g.create_dataset("objects/id", data=np.asarray(c.ids, dtype=np.int64))
        if c.level == "coarse":
            g["labels/oracle"].attrs["notation"] = COARSE_NOTATION
        notation = {"notation": COARSE_NOTATION} if other_level == "coarse" else {}
        schema.write_label_set(g, f"clevrskills_{other_level}", c.other.code, c.other.key_step,
                               c.other.pose_dict, **notation)

    schema.write_episode(path, c.episode, c.obs, c.main.code, c.main.key_step, c.success, c.objects,
                         c.main.pose_dict, extra=extra)
