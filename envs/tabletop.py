"""Base environment of the suite: table, Panda with suction cup, base and wrist cameras.

A task subclasses :class:`TabletopEnv` and implements ``sample_layout`` (objects, their poses
and the task parameters, from a seeded ``numpy`` generator), ``prompt``, ``evaluate_success``
and ``oracle`` (the scripted solver, as a generator of code lines for the skill API).

Conventions: world z is up, the table top is the plane z = 0, the robot base stands at
x = -0.615 facing +x. Control runs at 20 Hz over 5 physics substeps (100 Hz).

Action (7,) float32 in [-1, 1]: TCP translation delta (x, y, z; 1 = ``MAX_DELTA_POS`` m) in the
robot base frame, rotation delta (axis-angle; 1 = ``MAX_DELTA_ROT`` rad) and suction (> 0 on).

``wrist_camera=False`` leaves the wrist camera out (no ``wrist_rgb``): for policies that read no
wrist image (the state DP, the VLM, the oracle), rendering it was about half of the renderer's
cost of a control step (``policies.episodes.cached_env``, README "Batched evaluation").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import gymnasium as gym
import numpy as np
import sapien
import torch
from mani_skill.envs.sapien_env import BaseEnv
from mani_skill.sensors.camera import CameraConfig
from mani_skill.utils import sapien_utils
from mani_skill.utils.structs.types import SimConfig

from .objects import ObjectSpec, build_object
from .suction import Suction

ROBOT_BASE = (-0.615, 0.0, 0.0)
WORKSPACE_X = (-0.16, 0.14)  # where objects are spawned (m)
WORKSPACE_Y = (-0.22, 0.22)
TABLE_COLOUR = (0.62, 0.55, 0.45, 1.0)
BASE_CAMERA_EYE = [0.28, 0.0, 0.40]
BASE_CAMERA_TARGET = [-0.06, 0.0, 0.0]
BASE_CAMERA_FOV = np.deg2rad(56)


@dataclass
class Layout:
    """A sampled scene: objects, their initial poses and the task parameters."""

    objects: list[ObjectSpec]
    poses: list[tuple[float, float, float, float]]  # x, y, z of the centre, yaw (rad)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]


def place_apart(rng: np.random.Generator, specs: list[ObjectSpec], *, clearance: float = 0.05,
                tries: int = 1000) -> list[tuple[float, float, float, float]]:
    """Random non-overlapping table poses: centres at least r_i + r_j + clearance apart."""
    poses: list[tuple[float, float, float, float]] = []
    for spec in specs:
        for _ in range(tries):
            x, y = rng.uniform(*WORKSPACE_X), rng.uniform(*WORKSPACE_Y)
            if all(np.hypot(x - p[0], y - p[1]) >= spec.radius + o.radius + clearance
                   for p, o in zip(poses, specs)):
                break
        else:
            raise RuntimeError("could not place objects apart; workspace too small")
        poses.append((x, y, spec.height / 2, float(rng.uniform(-np.pi, np.pi))))
    return poses


class TabletopEnv(BaseEnv):
    """ClevrSkills-style tabletop task on ManiSkill3; see the module docstring for spaces."""

    SUPPORTED_ROBOTS = ["panda_suction"]
    SUPPORTED_OBS_MODES = ("rgb", "state_dict", "none")
    task_name: ClassVar[str] = "Tabletop"
    max_steps: ClassVar[int] = 400  # episode step cap (oracle and policies)

    def __init__(self, *args, image_size: int = 128, wrist_camera: bool = True, robot_uids="panda_suction",
                 **kwargs):
        self.image_size = int(image_size)
        self.wrist_camera = bool(wrist_camera)
        self.layout: Layout | None = None
        self._built_specs: list[ObjectSpec] | None = None
        self.actors: dict[str, Any] = {}
        self.specs: dict[str, ObjectSpec] = {}
        self.task_state: dict[str, Any] = {}
        kwargs.setdefault("sim_backend", "physx_cpu")
        kwargs["sensor_configs"] = {"width": self.image_size, "height": self.image_size,
                                    **kwargs.get("sensor_configs", {})}
        super().__init__(*args, robot_uids=robot_uids, control_mode="pd_ee_delta_pose", **kwargs)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, shape=(7,), dtype=np.float32)
        self.action_space = self.single_action_space

    # ---------------------------------------------------------------- task interface
    def sample_layout(self, rng: np.random.Generator) -> Layout:
        raise NotImplementedError

    def prompt(self) -> str:
        raise NotImplementedError

    def evaluate_success(self) -> bool:
        raise NotImplementedError

    def oracle(self, api) -> Iterator[str]:
        """Scripted solver: yields code lines; ``api`` gives read access to the scene."""
        raise NotImplementedError

    # ---------------------------------------------------------------- ManiSkill hooks
    @property
    def _default_sim_config(self):
        return SimConfig(sim_freq=100, control_freq=20)

    @property
    def _default_sensor_configs(self):
        # In front of the table, looking down at the workspace and the robot behind it.
        pose = sapien_utils.look_at(eye=BASE_CAMERA_EYE, target=BASE_CAMERA_TARGET)
        return [CameraConfig("base_camera", pose=pose, width=self.image_size, height=self.image_size,
                             fov=BASE_CAMERA_FOV, near=0.01, far=5.0)]

    @property
    def _default_human_render_camera_configs(self):
        pose = sapien_utils.look_at(eye=[0.42, 0.0, 0.52], target=[-0.08, 0.0, 0.0])
        return CameraConfig("render_camera", pose=pose, width=256, height=256,
                            fov=np.deg2rad(55), near=0.01, far=5.0)

    def _load_agent(self, options: dict):
        super()._load_agent(options, sapien.Pose(p=list(ROBOT_BASE)))
        self.agent.with_wrist_camera = self.wrist_camera  # read by its _sensor_configs (envs.robot)

    def _load_lighting(self, options: dict):
        self.scene.set_ambient_light([0.45, 0.45, 0.45])
        self.scene.add_directional_light([0.3, 0.3, -1], [0.8, 0.8, 0.8])
        self.scene.add_directional_light([-0.5, -0.2, -1], [0.35, 0.35, 0.35])

    def _load_scene(self, options: dict):
        builder = self.scene.create_actor_builder()
        half = [0.6, 0.7, 0.025]
        builder.add_box_collision(half_size=half)
        builder.add_box_visual(half_size=half, material=sapien.render.RenderMaterial(base_color=TABLE_COLOUR))
        builder.initial_pose = sapien.Pose(p=[-0.2, 0, -half[2]])
        self.table = builder.build_static(name="table")
        self.actors, self.specs = {}, {}
        for spec in self.layout.objects:
            self.actors[spec.name] = build_object(self.scene, spec, spec.name)
            self.specs[spec.name] = spec
        self._built_specs = list(self.layout.objects)

    def _after_reconfigure(self, options: dict):
        self.suction = Suction(self.scene, self.agent.hand, self.agent.tcp,
                               {n: (self.actors[n], self.specs[n]) for n in self.actors})
        params = self.scene.sensors["base_camera"].get_params()
        self._base_K = params["intrinsic_cv"][0].cpu().numpy().astype(np.float64)
        self._base_Rt = params["extrinsic_cv"][0].cpu().numpy().astype(np.float64)

    def _initialize_episode(self, env_idx: torch.Tensor, options: dict):
        qpos = torch.as_tensor(self.agent.keyframes["rest"].qpos, dtype=torch.float32)[None]
        self.agent.reset(qpos)
        self.agent.robot.set_pose(sapien.Pose(p=list(ROBOT_BASE)))
        for spec, (x, y, z, yaw) in zip(self.layout.objects, self.layout.poses):
            q = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
            self.actors[spec.name].set_pose(sapien.Pose(p=[x, y, z], q=q))
            self.actors[spec.name].set_linear_velocity(torch.zeros(1, 3))
            self.actors[spec.name].set_angular_velocity(torch.zeros(1, 3))
        self.suction.reset()
        self.task_state = {}

    def reset(self, seed=None, options=None):
        """Reset to the scene of ``seed`` (an int); rebuilds the scene when the objects change."""
        options = dict(options or {})
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
        if isinstance(seed, (list, tuple)):
            seed = seed[0]
        self.episode_seed = int(seed)
        self.layout = self.sample_layout(np.random.default_rng(self.episode_seed))
        if self._built_specs != self.layout.objects:
            options["reconfigure"] = True
        return super().reset(seed=self.episode_seed, options=options)

    def _step_action(self, action):
        action = torch.as_tensor(np.asarray(action, dtype=np.float32) if not torch.is_tensor(action) else action)
        action = action.reshape(-1, 7)
        self.suction.command(bool(action[0, 6] > 0))
        return super()._step_action(action[:, :6].clamp(-1, 1))

    def evaluate(self):
        success = bool(self.evaluate_success())
        return {"success": torch.tensor([success]), "attached": self.suction.attached or ""}

    def _get_obs_extra(self, info: dict):
        return dict(
            tcp_pose=self.agent.tcp.pose.raw_pose,
            suction=torch.as_tensor(self.suction.state())[None],
            bboxes=torch.as_tensor(self.object_bboxes(), dtype=torch.float32)[None],
            object_pose=torch.as_tensor(self.object_poses(), dtype=torch.float32)[None],
        )

    def compute_dense_reward(self, obs, action, info):
        return info["success"].float()

    def compute_normalized_dense_reward(self, obs, action, info):
        return info["success"].float()

    # ---------------------------------------------------------------- scene queries
    def object_pose(self, name: str) -> sapien.Pose:
        return self.actors[name].pose.sp

    def object_poses(self) -> np.ndarray:
        """(N, 7) float: world pose of each object (layout order): position (m), quaternion wxyz."""
        return np.array([np.concatenate([p.p, p.q]) for p in
                         (self.object_pose(s.name) for s in self.layout.objects)]).reshape(-1, 7)

    def object_bboxes(self) -> np.ndarray:
        """(N, 4) float: pixel box [x0, y0, x1, y1] of each object (layout order) in the base
        image, from its mesh vertices projected with the camera model (occlusion ignored),
        clipped to the image."""
        boxes = np.zeros((len(self.layout.objects), 4))
        for i, spec in enumerate(self.layout.objects):
            T = self.object_pose(spec.name).to_transformation_matrix()
            world = spec.vertices() @ T[:3, :3].T + T[:3, 3]
            cam = world @ self._base_Rt[:3, :3].T + self._base_Rt[:3, 3]
            uv = cam @ self._base_K.T
            uv = uv[:, :2] / np.maximum(uv[:, 2:3], 1e-6)
            lo, hi = uv.min(0), uv.max(0)
            boxes[i] = np.clip([lo[0], lo[1], hi[0], hi[1]], 0, self.image_size)
        return boxes


def observation_arrays(obs: dict) -> dict[str, np.ndarray]:
    """Flatten a ManiSkill observation of this suite (batch of 1) into numpy arrays::

        base_rgb  (H, W, 3) uint8   third-person camera
        wrist_rgb (H, W, 3) uint8   camera on the hand, looking along the cup
        qpos      (7,) float32      arm joint positions (rad)
        qvel      (7,) float32      arm joint velocities (rad/s)
        tcp_pose  (7,) float32      cup-lip pose in the world: position (m), quaternion wxyz
        suction   (2,) float32      [suction on, object attached]
        bboxes    (N, 4) float32    per object (layout order): [x0, y0, x1, y1] pixels in base_rgb
        object_pose (N, 7) float32  per object (layout order): world position (m), quaternion wxyz
                                    (privileged state: the ``state`` observation of the DP)
    """
    out = {
        "qpos": obs["agent"]["qpos"][0, :7],
        "qvel": obs["agent"]["qvel"][0, :7],
        "tcp_pose": obs["extra"]["tcp_pose"][0],
        "suction": obs["extra"]["suction"][0],
        "bboxes": obs["extra"]["bboxes"][0],
        "object_pose": obs["extra"]["object_pose"][0],
    }
    out = {k: np.asarray(v.cpu().numpy() if torch.is_tensor(v) else v, dtype=np.float32) for k, v in out.items()}
    sensors = obs.get("sensor_data", {})
    for cam, key in (("base_camera", "base_rgb"), ("wrist_camera", "wrist_rgb")):
        if cam in sensors:
            out[key] = sensors[cam]["rgb"][0].cpu().numpy().astype(np.uint8)
    return out
