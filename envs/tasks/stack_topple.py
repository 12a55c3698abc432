"""StackTopple (L1): stack three objects in the asked order, then topple the stack.

Success (stateful): the full stack stood at some step of the episode, and now the top object
lies on the table (nothing stands on anything).
"""

from ..skills.code import actor, call
from .common import bottom
from .registry import register_task
from .single_stack import SingleStack, stack_lines, stack_prompt, stacked


@register_task("StackTopple", level="L1", max_steps=450)
class StackTopple(SingleStack):
    """Scene sampling as SingleStack; prompt, success and oracle extended."""

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
