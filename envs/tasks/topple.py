"""Topple (L0): "Topple the red cylinder." One tall standing object (10 cm).

Success: the object's axis is tilted more than 60 degrees from vertical.
"""

import numpy as np

from ..objects import TALL_HEIGHT, sample_objects
from ..skills import controllers as C
from ..skills.code import actor, call
from ..tabletop import Layout, TabletopEnv
from .registry import register_task


@register_task("Topple", level="L0", max_steps=200)
class Topple(TabletopEnv):
    def sample_layout(self, rng):
        (obj,) = sample_objects(rng, 1, height=TALL_HEIGHT)
        pose = (rng.uniform(-0.12, 0.06), rng.uniform(-0.15, 0.15), obj.height / 2, float(rng.uniform(-np.pi, np.pi)))
        return Layout([obj], [pose], {"obj": obj.name})

    def prompt(self):
        return f"Topple the {self.layout.params['obj']}."

    def evaluate_success(self):
        return C.tilt(self.object_pose(self.layout.params["obj"])) > np.deg2rad(60)

    def oracle(self, api):
        obj = self.layout.params["obj"]
        yield call("move3d", actor(obj))
        yield call("topple", actor(obj))
        yield call("done")
