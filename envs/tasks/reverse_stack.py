"""ReverseStack (held out): three objects start stacked; rebuild the stack upside down.

"Stack the objects in reversed order." Success: the former top object is at the bottom,
the middle one on it and the former bottom object on top, none held.
"""

import numpy as np

from ..objects import sample_objects
from ..skills.code import actor, assign, call, stored
from ..tabletop import Layout, TabletopEnv
from .common import pick_and_place
from .registry import register_task
from .single_stack import stacked


@register_task("ReverseStack", level="held_out", max_steps=450)
class ReverseStack(TabletopEnv):
    def sample_layout(self, rng):
        objects = sample_objects(rng, 3)
        x, y = rng.uniform(-0.1, 0.08), rng.uniform(-0.12, 0.12)
        poses, z = [], 0.0
        for o in objects:  # bottom to top, each centred on the one below (upright prisms)
            poses.append((x, y, z + o.height / 2 + 0.001, float(rng.uniform(-np.pi, np.pi))))
            z += o.height + 0.001
        return Layout(objects, poses, {"order": [o.name for o in objects]})

    def prompt(self):
        return "Stack the objects in reversed order."

    def evaluate_success(self):
        return stacked(self, self.layout.params["order"][::-1])

    def oracle(self, api):
        bottom_, middle, top_ = self.layout.params["order"]
        yield assign("free", call("free_space", actor(top_)))
        yield from pick_and_place(api, top_, stored("free"))
        yield from pick_and_place(api, middle, actor(top_))
        yield from pick_and_place(api, bottom_, actor(middle))
        yield call("done")
