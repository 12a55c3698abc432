"""SingleStack (L1): "Stack the objects: the red cube at the bottom, then the blue cylinder,
then the green hexagon." Three objects.

Success: each object rests on the one before it, in the asked order, none held.
"""

from ..objects import sample_objects
from ..skills.code import actor, call
from ..tabletop import Layout, TabletopEnv, place_apart
from .common import on_top, pick_and_place
from .registry import register_task


def stack_prompt(order: list[str]) -> str:
    return f"Stack the objects: the {order[0]} at the bottom, then the {order[1]}, then the {order[2]}."


def stacked(env, order: list[str]) -> bool:
    return all(on_top(env, upper, lower) for lower, upper in zip(order, order[1:]))


def stack_lines(api, order: list[str]):
    for lower, upper in zip(order, order[1:]):
        yield from pick_and_place(api, upper, actor(lower))


@register_task("SingleStack", level="L1", max_steps=400)
class SingleStack(TabletopEnv):
    def sample_layout(self, rng):
        objects = sample_objects(rng, 3)
        return Layout(objects, place_apart(rng, objects), {"order": [o.name for o in objects]})

    def prompt(self):
        return stack_prompt(self.layout.params["order"])

    def evaluate_success(self):
        return stacked(self, self.layout.params["order"])

    def oracle(self, api):
        yield from stack_lines(api, self.layout.params["order"])
        yield call("done")
