"""PushToTarget (L1): "Push the red cube towards the blue cylinder." Three objects.

Success: the pushed object ends within 5 cm (edge to edge, by circumradii) of the target and
still stands; the target must not have been knocked over.
"""

import numpy as np

from ..objects import sample_objects
from ..skills.code import actor, call
from ..tabletop import Layout, TabletopEnv, place_apart
from .common import on_table, upright, xy
from .registry import register_task


@register_task("PushToTarget", level="L1", max_steps=250)
class PushToTarget(TabletopEnv):
    def sample_layout(self, rng):
        for _ in range(100):
            objects = sample_objects(rng, 3)
            poses = place_apart(rng, objects)
            a, b = np.array(poses[0][:2]), np.array(poses[1][:2])
            d = (b - a) / np.linalg.norm(b - a)
            c = np.array(poses[2][:2])
            # the third object must not block the push corridor from a to b
            t = np.clip((c - a) @ d, 0, np.linalg.norm(b - a))
            clear = np.linalg.norm(c - (a + t * d)) > objects[0].radius + objects[2].radius + 0.04
            far = np.linalg.norm(b - a) > objects[0].radius + objects[1].radius + 0.1
            if clear and far:
                return Layout(objects, poses, {"obj": objects[0].name, "target": objects[1].name})
        raise RuntimeError("no PushToTarget layout found")

    def prompt(self):
        p = self.layout.params
        return f"Push the {p['obj']} towards the {p['target']}."

    def evaluate_success(self):
        p = self.layout.params
        a, b = p["obj"], p["target"]
        gap = np.linalg.norm(xy(self, a) - xy(self, b)) - self.specs[a].radius - self.specs[b].radius
        return on_table(self, a) and upright(self, b) and gap < 0.05

    def oracle(self, api):
        p = self.layout.params
        yield call("move3d", actor(p["obj"]))
        yield call("push", actor(p["obj"]), towards=actor(p["target"]))
        yield call("done")
