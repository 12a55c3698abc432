"""VLMDP: the paper's hierarchical policy (section 4.3), VLM instructions + diffusion-policy actions.

At every control step the VLM is queried with the base image (it keeps its memory of key-steps).
Its output c_t (a key-step line, or the running line commented out with ``# ``) and the cache
info of the memory *before* t (ExtractMemoryInfo of M_t, as in training) condition the diffusion
policy, which predicts an action chunk ``(horizon, 7)``; the first ``n_action_steps`` actions
are executed from a queue, and a new chunk is predicted when the queue is empty.

``regenerate_on_keystep=True`` (paper default): when the VLM output is a *new key-step*
(``PlanStep.new_key_step``: a new subtask begins, the memory grew), the rest of the queued chunk
is dropped and a new chunk is predicted at once from the new instruction. With ``False`` every
chunk's ``n_action_steps`` actions are executed blindly (the chunking ablation, paper 5.2).

:class:`ChunkedDP` holds the action queue shared by VLMDP, FlatDP and DPOracle; they differ only
in where the instruction comes from (``next_instruction``). A step is written once, as the
generator ``act_steps`` that yields its VLM query and DP chunk request
(:mod:`policies.batching`): ``act`` serves them at once, an evaluator with B environments per
process serves those of B policies as batches.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from configs.errors import ConfigError
from datamodules.labels import POSE_DICT_ASSIGNMENT, commented, is_key_step, uncomment
from envs.skills import CodeError, Interpreter, SkillAPI

from .base import Planner, Policy, PolicyFailure, scene_objects
from .batching import ChunkRequest, PlanRequest, act


def configure_chunking(dp, horizon: int | None, n_action_steps: int | None) -> int:
    """Apply optional ``horizon`` / ``n_action_steps`` overrides to ``dp``; returns the number
    of actions to execute per chunk (checked: 1 <= n_action_steps <= horizon)."""
    if horizon and int(horizon) != int(dp.horizon):
        try:
            dp.horizon = int(horizon)
        except AttributeError:
            raise ConfigError(f"this diffusion policy cannot change its horizon ({dp.horizon})") from None
    if n_action_steps:
        dp.n_action_steps = int(n_action_steps)
    n = int(dp.n_action_steps)
    if not 1 <= n <= int(dp.horizon):
        raise ConfigError(f"n_action_steps={n} must be in [1, horizon={dp.horizon}]")
    return n


def is_done(line: str) -> bool:
    """The plan's end: the line ``done()``."""
    return line.strip() == "done()"


HOLD_THRESHOLD = 0.05  # action units (2.5 mm per step): below it on every axis, an action holds still
# How a chunk says that the DP's line is over (``line_end_check``; not in the paper):
#   tail:  the part after the executed actions holds: the line ends once they are executed.
#   chunk: the whole chunk holds, the executed actions too: the DP has stopped moving.
LINE_END_CHECKS = ("tail", "chunk")


def holds(actions: np.ndarray, threshold: float = HOLD_THRESHOLD) -> np.ndarray:
    """(n,) bool: which of ``actions`` (n, 7) hold still, no TCP translation above ``threshold``
    (action units) on any axis."""
    return np.all(np.abs(np.asarray(actions)[:, :3]) < threshold, axis=1)


def line_ends_in_chunk(chunk: np.ndarray, n_action_steps: int, check: str = "tail",
                       threshold: float = HOLD_THRESHOLD) -> bool:
    """A DP trained with ``chunk_end: line`` predicts holds after its line's end: True when the
    part of ``chunk`` (horizon, 7) that ``check`` names (:data:`LINE_END_CHECKS`; with ``tail``,
    the chunk's last quarter when all of it is executed) holds still, no TCP translation above
    ``threshold`` (action units) on any axis."""
    chunk = np.asarray(chunk)
    if check == "chunk":
        part = chunk
    else:
        part = chunk[n_action_steps:] if len(chunk) > n_action_steps else chunk[-max(1, len(chunk) // 4):]
    return bool(np.all(holds(part, threshold)))


EXECUTION_DEFAULTS = {"line_end_check": "tail", "max_line_steps": 100, "snap_holds": False}


def check_execution(settings: dict) -> None:
    """ConfigError unless ``settings`` (a DP config's ``execution``, or part of it) are valid."""
    unknown = set(settings) - set(EXECUTION_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown execution setting(s) {sorted(unknown)}; use {sorted(EXECUTION_DEFAULTS)}")
    if "line_end_check" in settings and settings["line_end_check"] not in LINE_END_CHECKS:
        raise ConfigError(f"unknown line_end_check {settings['line_end_check']!r}; use one of {list(LINE_END_CHECKS)}")
    steps = settings.get("max_line_steps", 1)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"max_line_steps={steps!r} must be an integer >= 1")
    if not isinstance(settings.get("snap_holds", False), (bool, np.bool_)):
        raise ConfigError(f"snap_holds={settings['snap_holds']!r} must be true or false")


def snap_to_holds(actions: np.ndarray, threshold: float = HOLD_THRESHOLD) -> np.ndarray:
    """``actions`` (n, 7) with the TCP translation of every action that holds (below
    ``threshold`` on every axis) set to exactly zero; orientation and suction unchanged."""
    actions = np.array(actions, dtype=np.float32, copy=True)
    actions[holds(actions, threshold), :3] = 0.0
    return actions


class ChunkedDP(Policy):
    """A diffusion policy executed from an action queue, conditioned on an instruction source.

    ``dp``: :class:`policies.diffusion_policy.DiffusionPolicy`-like: ``reset()``,
    ``predict_action_chunk(observation, instruction, cache_info) -> (horizon, 7)``, settable
    ``horizon`` and ``n_action_steps``. Subclasses implement ``reset_instructions(prompt)`` and
    ``next_instruction(observation) -> (instruction, new_key_step, cache_info)``.

    ``line_end_check`` and ``snap_holds`` (None: the DP checkpoint's own ``execution`` settings,
    configs/dp.yaml; else ``tail`` and False). An action *holds* when its TCP translation is below
    ``hold_threshold`` on every axis. With ``snap_holds`` (not in the paper) the executed actions
    that hold are executed as exact holds: a DP trained to hold (``chunk_end: line``) predicts
    zeros plus its sampling noise. Why it was tried (README, session 32): the image DP, hovering
    above ``move3d``'s object for 20 steps, rose 1.5 cm by that noise, and its ``pick`` then ended
    its descent short of the object and lifted without sealing. Measured: paced VLM+DP on L0 198/256
    against 171/256 (the place tasks 86 against 65 of 128); the hover still rises, by less.
    """

    def __init__(self, dp, *, regenerate_on_keystep: bool = True, n_action_steps: int | None = None,
                 horizon: int | None = None, line_end_check: str | None = None,
                 hold_threshold: float = HOLD_THRESHOLD, snap_holds: bool | None = None,
                 max_line_steps: int | None = None):
        super().__init__()
        self.dp = dp
        self.regenerate_on_keystep = bool(regenerate_on_keystep)
        # the execution settings: None takes the checkpoint's own (max_line_steps: the step cap of
        # one line, for the policies whose lines the DP paces: VLMDP, DPOracle's ``dp`` pace)
        line_end_check = self.dp_default("line_end_check") if line_end_check is None else line_end_check
        snap_holds = self.dp_default("snap_holds") if snap_holds is None else snap_holds
        max_line_steps = int(self.dp_default("max_line_steps") if max_line_steps is None else max_line_steps)
        check_execution({"line_end_check": line_end_check, "snap_holds": snap_holds, "max_line_steps": max_line_steps})
        self.line_end_check = line_end_check
        self.max_line_steps = max_line_steps
        if not 0 < float(hold_threshold) <= 1:
            raise ConfigError(f"hold_threshold={hold_threshold} must be in (0, 1] (action units)")
        self.hold_threshold = float(hold_threshold)
        self.snap_holds = bool(snap_holds)
        self.n_action_steps = configure_chunking(dp, horizon, n_action_steps)
        self.queue: deque[np.ndarray] = deque()

    def dp_default(self, name: str):
        """The DP checkpoint's own test-time setting ``name`` (its ``execution``), else
        :data:`EXECUTION_DEFAULTS`'s."""
        return (getattr(self.dp, "execution", None) or {}).get(name, EXECUTION_DEFAULTS[name])

    def reset_instructions(self, prompt: str) -> None:
        raise NotImplementedError

    def next_instruction(self, observation: dict) -> tuple[str, bool, str]:
        """(instruction c_t, whether it starts a new subtask, cache info of M_t) for this step."""
        raise NotImplementedError

    def instruction_steps(self, observation: dict):
        """``next_instruction`` as a generator that may yield model calls (VLMDP's query)."""
        return self.next_instruction(observation)
        yield  # unreachable: makes this a generator

    def pose_dict(self) -> dict:
        """key -> stored position (3,) that the instruction's ``pose_dict`` reads refer to
        (read by a state-observation DP; none by default)."""
        return {}

    @property
    def uses_state(self) -> bool:
        return getattr(self.dp, "observation", "rgb") == "state"

    @property
    def reads_wrist(self) -> bool:
        return not self.uses_state  # the image DP reads both cameras, the state DP none

    def _scene(self) -> dict:
        """``scene`` of a state-observation DP: the attached env's objects and the pose_dict."""
        if self.env is None:
            raise RuntimeError("a state-observation DP reads the scene: call attach(env) before reset")
        specs = [self.env.specs[o.name] for o in self.env.layout.objects]
        return {"names": [s.name for s in specs], "sizes": [(s.height, s.radius) for s in specs],
                "pose_dict": {k: tuple(v.p) for k, v in self.pose_dict().items()}}

    def reset(self, task: str, prompt: str) -> None:
        super().reset(task, prompt)
        self.reset_instructions(prompt)
        self.dp.reset()
        self.queue.clear()
        self.chunks = 0  # chunks predicted
        self.dropped_chunks = 0  # chunks cut short by a new key-step
        self.dropped_actions = 0
        self.key_steps = 0
        self.line_done = False  # the last chunk ends in holds: the DP's line is done once it is executed

    def act(self, observation: dict) -> np.ndarray:
        return act(self.act_steps(observation))

    def act_steps(self, observation: dict):
        instruction, new_key_step, cache_info = yield from self.instruction_steps(observation)
        self.instruction = instruction
        if new_key_step:
            self.key_steps += 1
            if self.regenerate_on_keystep and self.queue:
                self.dropped_chunks += 1
                self.dropped_actions += len(self.queue)
                self.queue.clear()
        if not self.queue:
            scene = self._scene() if self.uses_state else None
            chunk = self._checked((yield ChunkRequest(self.dp, observation, instruction, cache_info, scene)))
            executed = chunk[: self.n_action_steps]
            if self.snap_holds:
                executed = snap_to_holds(executed, self.hold_threshold)
            self.queue.extend(executed)
            self.chunks += 1
            self.line_done = line_ends_in_chunk(chunk, self.n_action_steps, self.line_end_check,
                                                self.hold_threshold)
        return self.queue.popleft()

    def _checked(self, chunk) -> np.ndarray:
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[1] != 7 or chunk.shape[0] < self.n_action_steps:
            raise ValueError(f"the diffusion policy returned a chunk of shape {chunk.shape}, "
                             f"expected ({self.dp.horizon}, 7)")
        if not np.all(np.isfinite(chunk)):
            raise PolicyFailure("invalid action", "the diffusion policy predicted non-finite actions")
        return chunk

    def stats(self) -> dict[str, float]:
        return {"chunks": float(self.chunks), "dropped_chunks": float(self.dropped_chunks),
                "dropped_actions": float(self.dropped_actions), "key_steps": float(self.key_steps)}


class VLMDP(ChunkedDP):
    """``planner``: a :class:`~policies.base.Planner` (``reset(prompt)``, ``step(image) -> PlanStep``,
    ``next_key_step(image)``, ``cache_info``, ``check_context``); ``dp``: see
    :class:`ChunkedDP`.

    ``keystep_on_hold`` (not in the paper; default True): when the DP's last chunk ended in holds
    (:func:`line_ends_in_chunk`: a DP trained with ``chunk_end: line`` finishes its line within
    the executed actions), the VLM is asked with the key-step request for the next line once
    those actions are executed, as VLM+Oracle asks it when a skill ends.
    Otherwise, and with False always, the VLM is queried as in the paper (``step``) and must see
    from the image alone that a subtask is over. Why: a DP that completes its line and holds
    leaves a still image, and the VLM, trained on one key-step frame per subtask against many
    frames of the running one, kept naming the running line (measured, README).

    ``query_every_step`` (default True, the paper): the VLM is queried at every control step.
    With False (not in the paper) the DP paces the plan, as a skill paces VLM+Oracle: while its
    line runs (its chunks do not end in holds) the VLM is not queried and the instruction is the
    running line commented out; when the line ends, the VLM gets the key-step request. After
    ``max_line_steps`` steps of one line it is asked anyway, with ``require_key_step``: it must
    name a new line, where it could answer "not finished" before (see Unfinished lines; counted
    as ``forced_key_steps``). Why that: the DP, given its line again, held at once, the VLM
    answered "not finished" again, and the line was re-issued at every step to the step cap (7 of
    the 13 failures of session 15's VLM+DP on L0; README). Why pacing: the VLM named the next line
    from the image before the DP had finished the running one (e.g. ``place`` while the held
    object was still moving towards the target, so the DP released it in the air; measured,
    README). It also saves most VLM queries.

    ``line_end_check`` (:class:`ChunkedDP`; not in the paper): ``tail`` (default) ends the DP's line
    when its chunk holds after the executed actions; ``chunk`` only when the whole chunk holds (the
    DP has stopped). Why (measured, README, session 31): the image DP, given ``push(...)`` above the
    object, often predicted a few small moves and then holds, and with ``tail`` the VLM was asked at
    once and wrote ``done()``; with ``chunk`` the DP keeps its line and pushes. Paired with a
    ``max_line_steps`` of 40 (a line whose chunks never hold throughout ends there), VLM+DP
    rose from 134/256 to 171/256 on L0 with the ``cpu_rgb`` DP, and to 198/256 with ``snap_holds``
    too (session 32); with the state DP of ``make demo`` it fell from 88/128 to 57/128 (other
    seeds). So ``tail`` stays the default, and the ``cpu_rgb`` preset's checkpoints carry
    ``chunk``, 40 and ``snap_holds`` (``execution`` in configs/dp/cpu_rgb.yaml).
    ``max_line_steps`` None: the DP checkpoint's own (``execution``), else 100.

    ``confirm_line_end`` (paced mode only; not in the paper; 0 = off): when the DP's line ends
    (its chunk ends in holds), the running motion line is given to the DP again as a key-step
    (plain, with the cache info of its first key-step), up to this many times per line, before
    the VLM is asked for the next one. A DP that is done holds on; one that stopped short goes on.
    Why (measured, README): the code DP ended Push's ``push`` after 7 of the oracle's 10 cm
    (success needs 8) and held, and the VLM, which cannot see the missing centimetre in a 64 px
    image, answered ``done()``; DP+Oracle's ``reissue_after`` showed that such a DP pushes on
    when given its line again. ``pose_dict`` assignments and ``done()`` are never repeated.

    Unfinished lines: when the VLM answers a key-step request with the running line commented out
    (``# `` + line, "that call is not finished"; a VLM trained with ``unfinished_request_fraction``
    learns to, one trained without it never does), the running line is given to the DP again as a
    key-step, with the cache info of its first key-step, and the memory does not grow (counted as
    ``reissued_lines``). It is ``confirm_line_end`` decided by the VLM from the image instead of
    done blindly, and what DP+Oracle's tracker does with ``reissue_after``. Not in the paper, whose
    DP is queried at every step and never asked to end a line.

    ``stop_on_done`` (default True; the paper does not say): the episode ends when the VLM writes
    ``done()`` (the action of that step, the DP's chunk for ``done()``, is still executed), as
    ``done()`` ends VLM+Oracle's program. With False the DP holds on ``done()`` and the VLM is asked
    again when that line ends, so a wrong ``done()`` runs on to the step cap. Measured (README): the
    same successes, seed for seed, in half the evaluation time; failures read "stopped without
    success" instead of "step cap".
    """

    kind = "vlm_dp"

    def __init__(self, planner: Planner, dp, keystep_on_hold: bool = True, query_every_step: bool = True,
                 confirm_line_end: int = 0, stop_on_done: bool = True, **chunking):
        super().__init__(dp, **chunking)
        self.planner = planner
        self.keystep_on_hold = bool(keystep_on_hold)
        self.query_every_step = bool(query_every_step)
        self.stop_on_done = bool(stop_on_done)
        self.confirm_line_end = int(confirm_line_end)
        if self.confirm_line_end < 0:
            raise ConfigError(f"confirm_line_end={self.confirm_line_end} must be >= 0 (0: off)")

    def reset_instructions(self, prompt: str) -> None:
        self.planner.reset(prompt, objects=scene_objects(self.env))
        self.vlm_errors = 0
        self.vlm_tokens = 0
        self.vlm_early_stops = 0
        self.keystep_requests = 0
        self.pose_errors = 0
        self.running = ""  # the last key-step line, and how many steps it has run
        self.line_steps = 0
        self.running_cache_info = ""  # the cache info the running line's key-step had
        self.confirmations = 0  # times the running line was given again (confirm_line_end)
        self.confirmed_lines = 0
        self.reissued_lines = 0  # times the VLM answered a request with "# <running line>" (unfinished)
        self.forced_key_steps = 0  # requests after max_line_steps steps of one line (require_key_step)
        # state DP: the VLM's pose_dict assignments are evaluated on the scene (queries only)
        self.interpreter = Interpreter(SkillAPI(self.env)) if self.uses_state and self.env is not None else None

    def next_instruction(self, observation: dict) -> tuple[str, bool, str]:
        return act(self.instruction_steps(observation))

    def instruction_steps(self, observation: dict):
        cache_info = self.planner.cache_info  # read before the query: ExtractMemoryInfo(M_t)
        line_over = self.line_done and not self.queue
        if not self.query_every_step and self.running and not line_over and self.line_steps < self.max_line_steps:
            self.line_steps += 1  # the DP's line runs on; the VLM is not asked
            return commented(self.running), False, cache_info
        if (not self.query_every_step and line_over and self.confirmations < self.confirm_line_end
                and self._repeatable(self.running)):
            self.line_steps += 1
            self.confirmations += 1
            self.confirmed_lines += 1
            return self._running_again()
        request = bool((self.keystep_on_hold and line_over) or not self.query_every_step)
        self.planner.check_context(observation["base_rgb"], request)  # "context full": see VLMPlanner
        must_advance = request and not self.query_every_step and bool(self.running) \
            and self.line_steps >= self.max_line_steps
        if request:
            self.line_done = False
            self.keystep_requests += 1
            self.forced_key_steps += must_advance
        step = yield PlanRequest(self.planner, observation["base_rgb"], keystep=request,
                                 require_key_step=must_advance)
        if step.new_key_step:
            self.running, self.line_steps = step.line, 1
            self.running_cache_info, self.confirmations = cache_info, 0
            self.finished = self.stop_on_done and is_done(step.line)
        else:
            self.line_steps += 1
        self.vlm_tokens += int(step.tokens or 0)
        self.vlm_errors += bool(step.error)
        self.vlm_early_stops += bool(step.early_stopped)
        if request and self._unfinished(step.line):  # the VLM: the running line is not finished
            self.reissued_lines += 1  # (line_steps counted above)
            return self._running_again()
        if self.interpreter is not None and step.new_key_step and POSE_DICT_ASSIGNMENT.match(step.line):
            try:
                self.interpreter.execute(step.line)  # stores the pose; its one-step hold is not run
            except CodeError:  # like any bad VLM line in VLM+DP: counted, not fatal (no pose stored)
                self.pose_errors += 1
        return step.line, bool(step.new_key_step), cache_info

    def _running_again(self) -> tuple[str, bool, str]:
        """The running line for the DP once more, as a key-step with its first key-step's cache info."""
        self.line_done = False
        return self.running, True, self.running_cache_info

    def _unfinished(self, line: str) -> bool:
        """``line`` is the running motion line commented out: the VLM's "not finished yet"."""
        return (not is_key_step(line) and bool(self.running) and uncomment(line) == self.running
                and self._repeatable(self.running))

    @staticmethod
    def _repeatable(line: str) -> bool:
        """A motion line (not a ``pose_dict`` assignment, not ``done()``): what confirm_line_end repeats."""
        return bool(line) and not POSE_DICT_ASSIGNMENT.match(line) and not is_done(line)

    def pose_dict(self) -> dict:
        return self.interpreter.api.pose_dict if self.interpreter is not None else {}

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "vlm_errors": float(self.vlm_errors), "vlm_tokens": float(self.vlm_tokens),
                "vlm_early_stops": float(self.vlm_early_stops), "keystep_requests": float(self.keystep_requests),
                "pose_errors": float(self.pose_errors), "confirmed_lines": float(self.confirmed_lines),
                "reissued_lines": float(self.reissued_lines), "forced_key_steps": float(self.forced_key_steps)}
