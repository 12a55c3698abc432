"""Rolling out episodes: one at a time (:func:`run_episode`) or B side by side (:func:`run_batched`).

An episode (:class:`Episode`) seeds the global RNGs and the env with its seed, gives the policy
the env and the task prompt, then alternates ``policy.act(observation)`` and ``env.step``. It
ends when the task is solved (``stop_on_success``), the policy has nothing more to do
(``policy.finished``: ``done()`` of code-executing policies), the policy raises
:class:`~policies.base.PolicyFailure` (or returns an action that is not a finite ``(7,)``), or
at the step cap (``max_steps``, default the task's ``env.max_steps``). Failure reasons:
``step cap``, ``stopped without success``, or the PolicyFailure's reason.

:func:`run_batched` keeps B episodes running in one process, one environment and one policy
per slot (the policies share their networks: ``policies.spec.build_policies``). The slots'
VLM queries and DP chunk requests go to the networks as batches (``policies.batching.serve``),
each environment steps as soon as its action is known, and a slot whose episode has ended
starts the next job. Episodes do not interact: each has its
own env, policy state and DP noise stream, and no part of a rollout draws from the global
RNGs (the env, the DP and the VLM use their own seeded generators), so an episode's outcome
depends on its seed only, up to the float rounding of batched matrix products.
"""

from __future__ import annotations

import contextlib
import gc
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from .base import Policy, PolicyFailure

MAX_CACHED_ENVS = 2  # environments kept alive per slot of a process (LRU)


# ---------------------------------------------------------------------------- results
@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    steps: int  # environment steps taken
    failure: str = ""  # reason category ("" on success)
    detail: str = ""  # what exactly went wrong
    stats: dict = field(default_factory=dict)  # the policy's per-episode counters


@dataclass
class Video:
    """A recorded episode: base-camera frames (T+1, H, W, 3) uint8 (the last one after the
    final step) and one caption per frame (the policy's instruction at that step)."""

    task: str
    seed: int
    success: bool
    frames: np.ndarray
    captions: list[str]

    def captioned(self, scale: int | None = None) -> list[np.ndarray]:
        """Frames with their caption bar (envs.video.caption), upscaled to about 256 px wide."""
        from envs.video import caption

        scale = scale or max(1, 256 // self.frames.shape[2])
        return [caption(f, c, scale=scale, lines=3) for f, c in zip(self.frames, self.captions)]

    @property
    def name(self) -> str:
        return f"{self.task}_seed{self.seed}_{'success' if self.success else 'fail'}"


# ---------------------------------------------------------------------------- RNGs
def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng():
    """Restore the global torch / numpy / random states afterwards (in-process evaluation inside
    a training run must not reset the trainer's randomness to the evaluation seeds)."""
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def frozen_gc():
    """Exempt the objects that exist now (networks, libraries: about 7 * 10^5 objects with VLM+DP
    loaded) from the cyclic garbage collector while rolling out, and unfreeze them afterwards.
    ManiSkill collects garbage at every reset that rebuilds the scene; that took 0.35 s per
    episode with the VLM+DP networks loaded, 0.015 s with them frozen (measured, one thread).
    Nothing is computed differently; garbage in cycles among the frozen objects (e.g. a cached
    env's scene replaced during the evaluation) waits until the unfreeze."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---------------------------------------------------------------------------- one episode
class Episode:
    """One rollout of ``policy`` in ``env`` (an env of ``envs.make_env``) for ``seed``, driven
    from outside: while ``running``, give ``apply`` the policy's action for ``observation()``."""

    def __init__(self, env, policy: Policy, seed: int, *, max_steps: int | None = None,
                 stop_on_success: bool = True, record_video: bool = False):
        self.env, self.policy, self.seed = env, policy, int(seed)
        self.stop_on_success, self.record_video = bool(stop_on_success), bool(record_video)
        base = env.unwrapped
        self.task = base.task_name
        seed_everything(seed)
        self.obs, _ = env.reset(seed=seed)
        policy.attach(base)
        policy.reset(base.task_name, base.prompt())
        self.cap = int(max_steps or base.max_steps)
        self.frames, self.captions = [], []
        self.steps, self.success, self.failure, self.detail = 0, False, "", ""
        self.over = False
        self._observation = None

    @property
    def running(self) -> bool:
        return not self.over and self.steps < self.cap and not self.policy.finished

    def observation(self) -> dict:
        """``envs.tabletop.observation_arrays`` of the current state."""
        from envs.tabletop import observation_arrays

        self._observation = observation_arrays(self.obs)
        return self._observation

    def apply(self, action) -> None:
        """Step the env with ``action`` ((7,) in [-1, 1]), or end the episode with the
        :class:`PolicyFailure` the policy raised instead."""
        try:
            if isinstance(action, PolicyFailure):
                raise action
            action = np.asarray(action, dtype=np.float32)
            if action.shape != (7,) or not np.all(np.isfinite(action)):
                raise PolicyFailure("invalid action", f"shape {action.shape}, finite: {np.isfinite(action).all()}")
            if self.record_video:
                self.frames.append(self._observation["base_rgb"])
                self.captions.append(f"{self.steps:3d} {self.policy.instruction}")
            self.obs, _, _, _, info = self.env.step(action)
            self.steps += 1
            self.success = bool(info["success"])
            if self.success and self.stop_on_success:
                self.over = True
        except PolicyFailure as e:
            self.success, self.failure, self.detail, self.over = False, e.reason, e.detail, True

    def result(self) -> tuple[EpisodeResult, Video | None]:
        from envs.tabletop import observation_arrays

        success, failure, detail = self.success, self.failure, self.detail
        if not success and not failure:
            failure = "step cap" if self.steps >= self.cap else "stopped without success"
            detail = f"{self.cap} steps" if self.steps >= self.cap else f"policy finished after {self.steps} steps"
        result = EpisodeResult(self.task, self.seed, success, self.steps, failure, detail, dict(self.policy.stats()))
        video = None
        if self.record_video:
            frames = self.frames + [observation_arrays(self.obs)["base_rgb"]]
            captions = self.captions + ["SUCCESS" if success else f"FAIL: {failure} {detail}"]
            video = Video(self.task, self.seed, success, np.stack(frames), captions)
        return result, video


def run_episode(env, policy: Policy, seed: int, *, max_steps: int | None = None, stop_on_success: bool = True,
                record_video: bool = False) -> tuple[EpisodeResult, Video | None]:
    """Roll out ``policy`` in ``env`` (an env of ``envs.make_env``) for ``seed``."""
    episode = Episode(env, policy, seed, max_steps=max_steps, stop_on_success=stop_on_success,
                      record_video=record_video)
    while episode.running:
        try:
            action = policy.act(episode.observation())
        except PolicyFailure as e:
            action = e
        episode.apply(action)
    return episode.result()


# ---------------------------------------------------------------------------- B episodes
def run_batched(policies: list[Policy], jobs: list[tuple[str, int, bool]], make_env, *, max_steps: int | None = None,
                stop_on_success: bool = True, next_job=None, on_result=None) -> dict[int, tuple]:
    """Run the episodes ``jobs`` (``(task, seed, record_video)``), ``len(policies)`` at a time.

    ``make_env(slot, task)``: the env of a slot. ``next_job()``: the index of the next job to
    run, or None when there is none (default: the jobs in order). ``on_result(index, outcome)``
    is called as each episode ends. Returns {job index: (EpisodeResult, Video | None)}.

    Scheduling: each slot runs its policy's ``act_steps`` until it waits on a model call. Each
    round serves the waiting calls as batches (``policies.batching.serve``), VLM queries first;
    DP chunk requests (``defer``) wait until no slot can go on without one, so that the slots'
    chunks are predicted together (with a chunk every ``n_action_steps`` steps, B environments
    stepped in lockstep would rarely ask in the same step). An environment steps as soon as its
    action is known; the slots drift apart in time, which changes nothing: episodes do not
    interact (see the module docstring).
    """
    from .batching import serve

    if next_job is None:
        order = deque(range(len(jobs)))
        next_job = lambda: order.popleft() if order else None  # noqa: E731
    B = len(policies)
    slots: list[tuple[int, Episode] | None] = [None] * B
    steps: list = [None] * B  # the act_steps generator of each slot's current control step
    pending: dict[int, object] = {}  # slot -> the model call it waits on
    outcomes: dict[int, tuple] = {}

    def refill(slot: int) -> None:
        slots[slot] = None
        while (index := next_job()) is not None:
            task, seed, record = jobs[index]
            episode = Episode(make_env(slot, task), policies[slot], seed, max_steps=max_steps,
                              stop_on_success=stop_on_success, record_video=record)
            slots[slot] = (index, episode)
            return

    def advance(slot: int, value) -> None:
        """Run the slot until it waits on a model call (or has no episode left)."""
        while slots[slot] is not None:
            index, episode = slots[slot]
            if steps[slot] is None:
                if not episode.running:
                    outcomes[index] = episode.result()
                    if on_result is not None:
                        on_result(index, outcomes[index])
                    refill(slot)
                    continue
                steps[slot], value = policies[slot].act_steps(episode.observation()), None
            try:
                pending[slot] = steps[slot].send(value)
                return
            except StopIteration as stop:
                action = stop.value
            except PolicyFailure as failure:
                action = failure
            steps[slot] = None
            episode.apply(action)

    for slot in range(B):
        refill(slot)
        advance(slot, None)
    while pending:
        now = [s for s in sorted(pending) if not getattr(pending[s], "defer", False)] or sorted(pending)
        results = serve([pending.pop(s) for s in now])
        for slot, result in zip(now, results):
            advance(slot, result)
    return outcomes


# ---------------------------------------------------------------------------- environments
_ENVS: dict[int, OrderedDict] = {}


def cached_env(task: str, image_size: int, backend: str = "auto", slot: int = 0, wrist_camera: bool = True):
    """An env of ``task`` from this process's small LRU cache of ``slot`` (creating one takes
    seconds; each slot of a batch has its own envs). ``wrist_camera``: the policy's
    ``reads_wrist`` (without it the step renders one camera: 1.3 ms of CPU less, measured)."""
    import envs

    cache = _ENVS.setdefault(int(slot), OrderedDict())
    key = (task, int(image_size), backend, bool(wrist_camera))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    while len(cache) >= MAX_CACHED_ENVS:
        _, old = cache.popitem(last=False)
        old.close()
    cache[key] = envs.make_env(task, image_size=image_size, backend=backend, wrist_camera=bool(wrist_camera))
    return cache[key]


def close_cached_envs() -> None:
    for cache in _ENVS.values():
        while cache:
            cache.popitem()[1].close()
    _ENVS.clear()


__all__ = ["EpisodeResult", "Video", "Episode", "run_episode", "run_batched", "seed_everything",
           "preserved_rng", "frozen_gc", "cached_env", "close_cached_envs", "MAX_CACHED_ENVS"]
