"""StackTopple (L1): stack three objects in the asked order, then topple the stack.

Success (stateful): the full stack stood at some step of the episode, and now the top object
lies on the table (nothing stands on anything).
"""

from ..objects import sample_objects
from ..skills.code import actor, call
from ..tabletop import Layout, TabletopEnv, place_apart
from .common import bottom
from .registry import register_task
from .single_stack import stack_lines, stack_prompt, stacked


@register_task("StackTopple", level="L1", max_steps=450)
class StackTopple(TabletopEnv):
    def sample_layout(self, rng):
        objects = sample_objects(rng, 3)
        return Layout(objects, place_apart(rng, objects), {"order": [o.name for o in objects]})

    def prompt(self):
        return stack_prompt(self.layout.params["order"])[:-1] + ", then topple the stack."

    def evaluate_success(self):
        order = self.layout.params["order"]
        if stacked(self, order):
            self.task_state["was_stacked"] = True
        return bool(self.task_state.get("was_stacked")) and bottom(self, order[-1]) < 0.01

    def oracle(self, api):
        order = self.layout.params["order"]
        yield from stack_lines(api, order)
        yield call("topple", actor(order[0]))
        yield call("done")
