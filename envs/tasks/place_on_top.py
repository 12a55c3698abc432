"""PlaceOnTop (L0): "Place the red cube on top of the blue cylinder." Three objects.

Success: the first object rests on the second (bottom on top, centred within the second's
footprint, upright) and the cup has let go.
"""

from ..skills.code import actor, call
from ..tabletop import Layout, TabletopEnv, place_apart
from ..objects import sample_objects
from .common import on_top, pick_and_place
from .registry import register_task


@register_task("PlaceOnTop", level="L0", max_steps=250)
class PlaceOnTop(TabletopEnv):
    def sample_layout(self, rng):
        objects = sample_objects(rng, 3)
        return Layout(objects, place_apart(rng, objects), {"obj": objects[0].name, "target": objects[1].name})

    def prompt(self):
        p = self.layout.params
        return f"Place the {p['obj']} on top of the {p['target']}."

    def evaluate_success(self):
        p = self.layout.params
        return on_top(self, p["obj"], p["target"])

    def oracle(self, api):
        p = self.layout.params
        yield from pick_and_place(api, p["obj"], actor(p["target"]))
        yield call("done")
