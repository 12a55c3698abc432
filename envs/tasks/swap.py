"""Swap (L1, non-Markovian): "Swap the positions of the red cube and the blue cylinder."

Three objects. The oracle stores both start poses in ``pose_dict`` at the beginning, parks the
first object on a free spot, and later needs the stored poses again: a policy without memory
cannot know where the objects were.

Success: each object stands within 3 cm of the other's start position.
"""

import numpy as np

from ..objects import sample_objects
from ..skills.code import actor, assign, call, stored
from ..tabletop import Layout, TabletopEnv, place_apart
from .common import on_table, pick_and_place, xy
from .registry import register_task

TOLERANCE = 0.03


@register_task("Swap", level="swap", max_steps=500)
class Swap(TabletopEnv):
    def sample_layout(self, rng):
        objects = sample_objects(rng, 3)
        poses = place_apart(rng, objects)
        return Layout(objects, poses, {"a": objects[0].name, "b": objects[1].name,
                                       "start_a": poses[0][:2], "start_b": poses[1][:2]})

    def prompt(self):
        p = self.layout.params
        return f"Swap the positions of the {p['a']} and the {p['b']}."

    def evaluate_success(self):
        p = self.layout.params
        return (on_table(self, p["a"]) and on_table(self, p["b"])
                and np.linalg.norm(xy(self, p["a"]) - p["start_b"]) < TOLERANCE
                and np.linalg.norm(xy(self, p["b"]) - p["start_a"]) < TOLERANCE)

    def oracle(self, api):
        a, b = self.layout.params["a"], self.layout.params["b"]
        yield assign(a, call("get_pose", actor(a)))
        yield assign(b, call("get_pose", actor(b)))
        yield assign("free", call("free_space", actor(a)))
        yield from pick_and_place(api, a, stored("free"))
        yield from pick_and_place(api, b, stored(a))
        yield from pick_and_place(api, a, stored(b))
        yield call("done")
