"""DPOracle (paper 5.1, non-Markovian Swap, Figure 4): the DP told the oracle's computed positions.

The task's oracle runs in lockstep with the episode, but its actions are *not* executed: each
step its closed-loop skill generator is advanced on the current scene only to track which code
line is current (a skill ends by its own termination test, exactly as when it acts, so the line
changes when the DP's actions have done what the line asks, or when the skill gives up). The
diffusion policy is conditioned on that line with every ``pose_dict['key']`` read replaced by the
position the oracle computed, e.g.::

    pose_dict['red cube'] = get_pose(get_actor('red cube'))  ->  pose_dict['red cube'] = (0.052, -0.118, 0.025)
    move3d(pose_dict['red cube'])                            ->  move3d((0.052, -0.118, 0.025))

so it needs no memory: this is the Markovian version of the task that the paper calls
DP+Oracle. As in the labels, the line is plain at its key-step and commented (``# ``) on later
steps; the cache info is ExtractMemoryInfo of the numeric key-step lines before t. Action
chunks are regenerated when the oracle's line changes (``regenerate_on_keystep``), as in VLMDP.
A DP for this policy must be trained on labels in the same form: :func:`numeric_line`.
With ``insert_positions=False`` the oracle's lines are passed as they are (the labels a ``code``
DP was trained on): the oracle as the high-level planner, e.g. to evaluate a code-conditioned DP
during training without a VLM.

``pace`` says who ends a line:
  * ``tracker`` (default): the oracle's skill ends it, by its own termination test on the scene
    the DP leaves (above).
  * ``dp`` (not in the paper): the DP ends it, as the DP paces VLM+DP with
    ``query_every_step=false``: the oracle's program gives its next line when the DP's chunk ends
    in holds (a DP trained with ``chunk_end: line`` holds at its line's end;
    :func:`~policies.vlm_dp.line_ends_in_chunk`), or after ``max_line_steps`` steps of one line
    (None: the DP checkpoint's own ``execution``, as in VLMDP).
    The program's queries (``pose_dict`` assignments) are still evaluated on the current scene;
    its skills are never stepped, so no skill's step cap or phase can end a line that the DP is
    still executing.

``reissue_after`` (``tracker`` pace; not in the paper; default 36, 0 = off): when one line has
run that many steps since its key-step and the oracle's skill has not ended it, the line is
given to the DP again as a key-step (plain, not commented; the memory is unchanged), as a
planner repeats an instruction that was not carried out. Why (measured, README): a DP that had
pushed an object 6 of the 10 cm lifted off and hovered under the commented ``# push(...)`` line
until the step cap, a state no demonstration shows; given ``push(...)`` again from there it
pushes again. 36: the longest line of the L0 demonstrations (Push's ``push``).
"""

from __future__ import annotations

import re

from datamodules.labels import POSE_DICT_READ, commented, extract_memory_info
from envs.oracle import SkillExecutor
from envs.skills import CodeError

from configs.errors import ConfigError

from .base import PolicyFailure
from .vlm_dp import ChunkedDP

PACES = ("tracker", "dp")  # who ends a line: the oracle's skill, or the DP (holds at its line's end)
_POSE_ASSIGN = re.compile(r"^\s*pose_dict\[(['\"])(.*?)\1\]\s*=(?!=)")


def format_position(pose) -> str:
    """A stored Pose as ``(x, y, z)`` in metres, millimetre precision."""
    return "(" + ", ".join(f"{v:.3f}" for v in pose.p) + ")"


def numeric_line(line: str, pose_dict: dict) -> str:
    """``line`` with its ``pose_dict`` reads (and an assignment's value) replaced by positions.

    ``pose_dict``: key -> :class:`envs.skills.Pose` (``SkillAPI.pose_dict``); unknown keys are
    left as they are.
    """
    def value(match) -> str:
        key = match.group(2)
        return format_position(pose_dict[key]) if key in pose_dict else match.group(0)

    m = _POSE_ASSIGN.match(line)
    if m and m.group(2) in pose_dict:
        return f"pose_dict[{m.group(2)!r}] = {format_position(pose_dict[m.group(2)])}"
    return POSE_DICT_READ.sub(value, line)


class OracleTracker:
    """Advances the task's oracle program one step per call without executing its actions.

    ``slack`` multiplies the skills' tolerances and step caps (``controllers.Motion.slack``): the
    tracker follows a learned policy, which reaches a skill's goal less precisely and more slowly
    than the skill itself would (e.g. move3d waits for 6 mm, push's rise gives up after 13 steps).
    """

    def __init__(self, env, slack: float = 2.0):
        self.env = env.unwrapped
        self.slack = float(slack)

    def reset(self) -> None:
        self.executor = SkillExecutor(self.env)
        self.executor.api.motion.slack = self.slack
        self.program = iter(self.env.oracle(self.executor.api))
        self.ended = False

    def next_line(self) -> str | None:
        """Start the program's next line without stepping its skill (its query, if any, is
        evaluated on the current scene); None when the program has ended."""
        line = next(self.program, None)
        if line is None:
            self.ended = True
            return None
        try:
            self.executor.start(line)
        except CodeError as e:
            raise PolicyFailure("oracle error", f"{line!r}: {e}") from None
        return self.executor.line

    def step(self) -> tuple[str, bool]:
        """(current code line, whether this step is its key-step); after the program has ended,
        the last line stays current. An oracle query that fails on the scene the DP left
        (e.g. no free space) raises PolicyFailure("oracle error")."""
        if self.ended:
            return self.executor.line or "", False
        try:
            action = self.executor.next_action()
            while action is None:
                line = next(self.program, None)
                if line is None:
                    self.ended = True
                    return self.executor.line or "", False
                self.executor.start(line)
                action = self.executor.next_action()
        except CodeError as e:
            raise PolicyFailure("oracle error", f"{self.executor.line!r}: {e}") from None
        return self.executor.line, self.executor.key_step


class DPOracle(ChunkedDP):
    """``dp``: see :class:`~policies.vlm_dp.ChunkedDP`; needs ``attach(env)`` (the oracle reads the scene)."""

    kind = "dp_oracle"

    def __init__(self, dp, *, insert_positions: bool = True, tracker_slack: float = 2.0, pace: str = "tracker",
                 reissue_after: int = 36, **chunking):
        super().__init__(dp, **chunking)
        if pace not in PACES:
            raise ConfigError(f"unknown pace {pace!r} for dp_oracle; use one of {list(PACES)}")
        self.insert_positions = bool(insert_positions)
        self.tracker_slack = float(tracker_slack)
        self.pace = pace
        self.reissue_after = int(reissue_after)
        if self.reissue_after < 0:
            raise ConfigError(f"reissue_after={self.reissue_after} must be >= 0 (0: off)")

    def reset_instructions(self, prompt: str) -> None:
        if self.env is None:
            raise RuntimeError("DPOracle follows the oracle: call attach(env) before reset")
        self.tracker = OracleTracker(self.env, self.tracker_slack)
        self.tracker.reset()
        self.memory: list[str] = []
        self.current = ""
        self.line_steps = 0  # steps since the running line's key-step
        self.reissued = 0

    def pose_dict(self) -> dict:
        return self.tracker.executor.api.pose_dict

    def next_instruction(self, observation: dict) -> tuple[str, bool, str]:
        cache_info = extract_memory_info(self.memory)  # M_t: key-step lines before t
        line, key_step = self.tracker.step() if self.pace == "tracker" else self._dp_paced_line()
        if self.pace == "tracker":
            self.line_steps = 1 if key_step else self.line_steps + 1
            if (not key_step and self.reissue_after and self.current and not self.tracker.ended
                    and self.line_steps > self.reissue_after):
                self.line_steps, self.reissued = 1, self.reissued + 1
                return self.current, True, cache_info  # the same line again, as a key-step
        if key_step:
            self.current = numeric_line(line, self.tracker.executor.api.pose_dict) if self.insert_positions else line
            self.memory.append(self.current)
            return self.current, True, cache_info
        return commented(self.current), False, cache_info

    def _dp_paced_line(self) -> tuple[str, bool]:
        """``pace='dp'``: (line, key-step) where the DP's line ending starts the program's next line."""
        line_over = self.line_done and not self.queue
        if self.tracker.ended or (self.current and not line_over and self.line_steps < self.max_line_steps):
            self.line_steps += 1
            return self.tracker.executor.line or "", False
        self.line_done, self.line_steps = False, 1
        line = self.tracker.next_line()
        return (line, True) if line is not None else (self.tracker.executor.line or "", False)

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "reissued_lines": float(self.reissued)}
