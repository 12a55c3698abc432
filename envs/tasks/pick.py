"""Pick (L0, held out): "Pick up the red cube." Three objects.

Success: the object is held by the cup at least 5 cm above the table.
"""

from ..objects import sample_objects
from ..skills.code import actor, call
from ..tabletop import Layout, TabletopEnv, place_apart
from .common import bottom
from .registry import register_task


@register_task("Pick", level="held_out", max_steps=150)
class Pick(TabletopEnv):
    def sample_layout(self, rng):
        objects = sample_objects(rng, 3)
        return Layout(objects, place_apart(rng, objects), {"obj": objects[0].name})

    def prompt(self):
        return f"Pick up the {self.layout.params['obj']}."

    def evaluate_success(self):
        obj = self.layout.params["obj"]
        return self.suction.attached == obj and bottom(self, obj) > 0.05

    def oracle(self, api):
        obj = self.layout.params["obj"]
        for _ in range(2):
            yield call("move3d", actor(obj))
            yield call("pick", actor(obj))
            if self.suction.attached == obj:
                break
        yield call("done")
