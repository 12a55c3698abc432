"""Panda arm with a suction cup: the robot of every task.

Kinematics and inertias are ManiSkill's Panda; visuals are low-poly (see ``assets.py``).
The arm is driven by ManiSkill's ``pd_ee_delta_pose`` controller; the suction channel (7th
action dimension) is handled by the environment (``suction.py``), not by a joint.
"""

from __future__ import annotations

from copy import deepcopy

import numpy as np
import sapien
from mani_skill.agents.base_agent import BaseAgent, Keyframe
from mani_skill.agents.controllers import PDEEPoseControllerConfig, PDJointPosControllerConfig
from mani_skill.agents.registration import register_agent
from mani_skill.sensors.camera import CameraConfig

from .assets import panda_suction_urdf

# Action bounds of the arm: a normalised action of 1 moves the TCP by MAX_DELTA_POS metres
# (rotates by MAX_DELTA_ROT radians) in one control step.
MAX_DELTA_POS = 0.05
MAX_DELTA_ROT = 0.25


@register_agent()
class PandaSuction(BaseAgent):
    uid = "panda_suction"
    urdf_config = dict()
    # TCP at (-0.18, 0, 0.27), cup pointing down, arm clear of the base camera view.
    keyframes = dict(
        rest=Keyframe(qpos=np.array([0.0, -0.3, 0.0, -2.5, 0.0, 2.2, np.pi / 4]), pose=sapien.Pose())
    )
    arm_joint_names = [f"panda_joint{i}" for i in range(1, 8)]
    ee_link_name = "panda_hand_tcp"
    arm_stiffness = 1e4  # stiff enough that the TCP covers the commanded delta in one step
    arm_damping = 2e2
    arm_force_limit = 200

    def __init__(self, *args, **kwargs):
        self.urdf_path = panda_suction_urdf()
        super().__init__(*args, **kwargs)

    @property
    def _controller_configs(self):
        pd_ee_delta_pose = PDEEPoseControllerConfig(
            joint_names=self.arm_joint_names,
            pos_lower=-MAX_DELTA_POS,
            pos_upper=MAX_DELTA_POS,
            # ManiSkill 3.0.1 scales the normalised rotation by ``rot_lower`` (not by the
            # bound's magnitude), so a negative bound would flip the rotation's sign.
            rot_lower=MAX_DELTA_ROT,
            rot_upper=MAX_DELTA_ROT,
            stiffness=self.arm_stiffness,
            damping=self.arm_damping,
            force_limit=self.arm_force_limit,
            ee_link=self.ee_link_name,
            urdf_path=self.urdf_path,
        )
        pd_joint_pos = PDJointPosControllerConfig(
            self.arm_joint_names, lower=None, upper=None, stiffness=self.arm_stiffness,
            damping=self.arm_damping, force_limit=self.arm_force_limit, normalize_action=False,
        )
        return deepcopy(dict(pd_ee_delta_pose=dict(arm=pd_ee_delta_pose),
                             pd_joint_pos=dict(arm=pd_joint_pos)))

    @property
    def _sensor_configs(self):
        size = 128  # the env's ``image_size`` overrides it through ``sensor_configs``
        if not getattr(self, "with_wrist_camera", True):  # TabletopEnv(wrist_camera=False)
            return []
        return [
            CameraConfig(uid="wrist_camera", pose=sapien.Pose(), width=size, height=size,
                         fov=np.deg2rad(80), near=0.01, far=5.0,
                         mount=self.robot.links_map["camera_link"])
        ]

    def _after_init(self):
        self.tcp = self.robot.links_map[self.ee_link_name]
        self.hand = self.robot.links_map["panda_hand"]
