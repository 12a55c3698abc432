"""Run an oracle episode: the task's solver emits code lines, the interpreter runs them.

Every environment step is labelled with the code line whose skill produced the action; the
first step of each call is its key-step. Executing the oracle through the same interpreter
that runs learned plans means every oracle line is, by construction, valid API code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .skills import CodeError, Interpreter, SkillAPI


@dataclass
class StepRecord:
    line: str  # the code of the running skill call
    key_step: bool  # first step of that call


@dataclass
class Episode:
    """One rolled-out episode. Arrays are stacked over T steps."""

    task: str
    seed: int
    prompt: str
    objects: list[str]
    success: bool
    steps: list[StepRecord] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    observations: list[dict] = field(default_factory=list)  # obs *before* each action
    successes: list[bool] = field(default_factory=list)  # task solved *after* each action
    failure: str = ""
    pose_dict: dict = field(default_factory=dict)  # key -> stored position (3,), at the episode's end

    @property
    def key_lines(self) -> list[str]:
        """The code program: the key-step lines in order."""
        return [s.line for s in self.steps if s.key_step]

    def __len__(self) -> int:
        return len(self.steps)


class SkillExecutor:
    """Runs skill-API code one control step at a time (the step-wise core of :func:`run_code`).

    ``start(line)`` parses and evaluates a line with the safe interpreter (``CodeError`` or
    ``UnknownObjectError`` on bad code) and makes its skill the running call; ``next_action()``
    returns the call's next (7,) action, or ``None`` once the call has terminated. A call with
    nothing to do still yields one still action, so that every key-step has a frame.
    Policies that execute oracle skills (oracle, VLM+Oracle, DP+Oracle) use this directly.
    """

    def __init__(self, env):
        self.env = env.unwrapped
        self.api = SkillAPI(self.env)
        self.interpreter = Interpreter(self.api)
        self.line: str | None = None  # the line of the running (or last) call
        self.skill_name: str | None = None
        self.key_step = False  # the last returned action is the first of its call
        self._skill = None
        self._fresh = False

    def start(self, line: str) -> None:
        """Begin the call of ``line`` (an assignment stores its pose now and holds one step)."""
        skill = self.interpreter.execute(line)
        self.line, self.skill_name, self._skill, self._fresh = line, skill.name, skill, True

    def next_action(self) -> np.ndarray | None:
        """The next (7,) action of the running call, or ``None`` when it has terminated."""
        if self._skill is None:
            return None
        try:
            action = next(self._skill.gen)
        except StopIteration as stop:
            self.api.last_ok = bool(stop.value)
            if not self._fresh:
                self._skill = None
                return None
            action = self.api.motion.action(np.zeros(3), self.env.suction.on)
            self._skill.gen = iter(())
        self.key_step, self._fresh = self._fresh, False
        return action


def run_code(env, lines, *, seed: int, record_obs: bool = False, max_steps: int | None = None,
             reset: bool = True, obs=None, speed_scale: float = 1.0,
             travel_height: float | None = None) -> Episode:
    """Execute code lines (an iterable, possibly a generator reading the scene) in ``env``.

    ``lines`` may be a callable ``api -> iterable`` (the oracle) or a list of key-step lines
    (a replay). Code errors end the episode as a failure with the reason recorded.
    ``speed_scale`` multiplies every speed the skills command and ``travel_height`` (m) is their
    lowest travel height (``controllers.Motion``; None: the scripted one).
    """
    if reset:
        obs, _ = env.reset(seed=seed)
    base = env.unwrapped
    executor = SkillExecutor(base)
    executor.api.motion.speed_scale = float(speed_scale)
    if travel_height is not None:
        executor.api.motion.min_travel_height = float(travel_height)
    program = lines(executor.api) if callable(lines) else iter(lines)
    cap = max_steps or base.max_steps
    ep = Episode(task=base.task_name, seed=seed, prompt=base.prompt(), objects=list(base.specs), success=False)
    try:
        for line in program:
            executor.start(line)
            while (action := executor.next_action()) is not None:
                if len(ep.steps) >= cap:
                    ep.failure = f"step cap {cap} reached"
                    break
                ep.steps.append(StepRecord(line, executor.key_step))
                ep.actions.append(action)
                if record_obs:
                    ep.observations.append(obs)
                obs, _, _, _, info = env.step(action)
                ep.successes.append(bool(info["success"]))
            if ep.failure or executor.skill_name == "done":
                break
    except CodeError as e:
        ep.failure = f"code error: {e}"
    ep.pose_dict = {k: tuple(float(v) for v in pose.p) for k, pose in executor.api.pose_dict.items()}
    ep.success = bool(base.evaluate_success()) and not ep.failure.startswith("code error")
    if not ep.success and not ep.failure:
        ep.failure = "task not solved"
    return ep


def run_oracle(env, seed: int, **kwargs) -> Episode:
    """Solve the task of ``env`` for ``seed`` with its scripted oracle."""
    return run_code(env, env.unwrapped.oracle, seed=seed, **kwargs)


# Per-seed variations of the oracle's demonstrations: ``make data <name>=[lo,hi]`` draws each seed's
# value uniformly in [lo, hi] from the seed's own random stream (so its scene is unchanged) and
# passes it to :func:`run_code` as ``keyword``. [default, default]: as scripted. Not in the paper.
ORACLE_VARIATIONS = {
    # skill speeds x a factor: how long a skill runs no longer tells how far it has got
    "oracle_speed": {"keyword": "speed_scale", "default": 1.0, "bounds": (0.2, 2.0), "stream": 0x5BEED},
    # the lowest travel height (m): a pick or push starts its descent from varied heights
    "oracle_travel_height": {"keyword": "travel_height", "default": 0.12, "bounds": (0.08, 0.25),
                             "stream": 0x7A1E},
}


def oracle_variation(seed: int, name: str, value_range) -> float:
    """Seed ``seed``'s value of the variation ``name`` (a key of ``ORACLE_VARIATIONS``), uniform in
    ``value_range`` = (lo, hi) from its own random stream; lo == hi gives lo."""
    lo, hi = (float(v) for v in value_range)
    if lo == hi:
        return lo
    return float(np.random.default_rng([int(seed), ORACLE_VARIATIONS[name]["stream"]]).uniform(lo, hi))


def not_as_scripted(ranges: dict) -> dict:
    """The entries of ``ranges`` = {variation name: (lo, hi)} other than [default, default]."""
    return {n: tuple(r) for n, r in ranges.items() if tuple(r) != (ORACLE_VARIATIONS[n]["default"],) * 2}


def oracle_variations(seed: int, ranges: dict) -> dict:
    """``run_code`` keywords of seed ``seed`` for ``ranges`` = {variation name: (lo, hi)}."""
    return {ORACLE_VARIATIONS[n]["keyword"]: oracle_variation(seed, n, r) for n, r in ranges.items()}
