"""Rollout evaluation: N episodes per task with fixed seeds, optionally in parallel processes.

    from policies.evaluator import evaluate
    from policies.spec import PolicySpec

    result = evaluate(PolicySpec("vlm_dp", dp=..., vlm=...), "L0+L1", episodes=64, workers=2)
    result.per_task["PlaceOnTop"].success_rate, result.mean_success
    print(result.table_markdown()); result.to_csv("results.csv")

Seeds. Episode i of every task uses seed ``seed_start + i``, with ``seed_start = 100000`` by
default (:data:`DEFAULT_SEED_START`): far from the data-generation seeds (``make data`` starts at
0), so no evaluation scene was seen in training; the paper evaluates 64 seeds per task. The seed
fixes the scene, and the global RNGs (torch, numpy, random) are seeded with it at the start of
each episode, so an episode's outcome does not depend on which process ran it or in what order.

Parallelism. ``workers=0`` runs in this process (the policy may then be a live Policy object);
``workers=N`` runs N spawned worker processes (never fork: one ManiSkill env per process), each
building its own policy from the picklable :class:`~policies.spec.PolicySpec`. Seeds can be
sharded over ranks: rank r of w runs ``seeds[r::w]`` (the rollout callback does this under DDP);
:meth:`EvalResult.counts` are summed over ranks to get the totals.

Episodes. Each runs until the task is solved (``stop_on_success``), the policy has nothing more
to do (``done()`` of code-executing policies), it raises :class:`~policies.base.PolicyFailure`,
or the step cap (``max_steps``, default the task's own: ``env.max_steps``) is reached. Failure
reasons: ``step cap``, ``stopped without success``, or the PolicyFailure's reason. The first
``video_episodes`` episodes of each task (in this rank's shard) are recorded as base-camera
videos whose captions carry the policy's current instruction.
"""

from __future__ import annotations

import contextlib
import csv
import io
import multiprocessing as mp
import os
import random
import time
from collections import Counter, OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .base import Policy, PolicyFailure
from .spec import PolicySpec, build_policy

DEFAULT_SEED_START = 100_000
DEFAULT_EPISODES = 64  # paper: 64 seeds per task
MAX_CACHED_ENVS = 2  # environments kept alive per process (LRU)


def evaluation_seeds(episodes: int = DEFAULT_EPISODES, seed_start: int = DEFAULT_SEED_START) -> list[int]:
    """The fixed evaluation seeds: ``seed_start, seed_start + 1, ...`` (``episodes`` of them)."""
    return list(range(int(seed_start), int(seed_start) + int(episodes)))


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


@dataclass
class TaskResult:
    task: str
    episodes: list[EpisodeResult]

    @property
    def n(self) -> int:
        return len(self.episodes)

    @property
    def successes(self) -> int:
        return sum(e.success for e in self.episodes)

    @property
    def success_rate(self) -> float:
        return self.successes / self.n if self.n else float("nan")

    @property
    def mean_length(self) -> float:
        """Mean episode length (steps) over all episodes."""
        return float(np.mean([e.steps for e in self.episodes])) if self.episodes else float("nan")

    @property
    def failure_reasons(self) -> dict[str, int]:
        """Failure reason -> count, most frequent first."""
        return dict(Counter(e.failure for e in self.episodes if not e.success).most_common())

    @property
    def mean_stats(self) -> dict[str, float]:
        keys = sorted({k for e in self.episodes for k in e.stats})
        return {k: float(np.mean([e.stats.get(k, 0.0) for e in self.episodes])) for k in keys}


COUNT_FIELDS = ("successes", "episodes", "steps")


def success_metrics(tasks: list[str], counts: np.ndarray, prefix: str = "rollout") -> dict[str, float]:
    """Scalars from per-task counts ``(len(tasks), 3)`` = successes, episodes, steps (summed
    over ranks): ``<prefix>/success/<task>``, ``<prefix>/success/mean`` (mean over tasks),
    ``<prefix>/episode_length/mean`` and ``<prefix>/episodes``."""
    counts = np.asarray(counts, dtype=np.float64).reshape(len(tasks), len(COUNT_FIELDS))
    out, rates = {}, []
    for task, (succ, n, _) in zip(tasks, counts):
        if n > 0:
            out[f"{prefix}/success/{task}"] = succ / n
            rates.append(succ / n)
    out[f"{prefix}/success/mean"] = float(np.mean(rates)) if rates else float("nan")
    total = counts[:, 1].sum()
    out[f"{prefix}/episode_length/mean"] = float(counts[:, 2].sum() / total) if total else float("nan")
    out[f"{prefix}/episodes"] = float(total)
    return out


@dataclass
class EvalResult:
    """Per-task results of one evaluation (of one rank's shard when sharded)."""

    policy: str
    tasks: list[str]
    per_task: dict[str, TaskResult]
    videos: list[Video] = field(default_factory=list)
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1

    @property
    def mean_success(self) -> float:
        """Mean over tasks of the per-task success rates."""
        rates = [r.success_rate for r in self.per_task.values() if r.n]
        return float(np.mean(rates)) if rates else float("nan")

    @property
    def episodes(self) -> list[EpisodeResult]:
        return [e for r in self.per_task.values() for e in r.episodes]

    def counts(self) -> np.ndarray:
        """(len(tasks), 3) float64: successes, episodes, steps per task (sum these over ranks)."""
        return np.array([[r.successes, r.n, sum(e.steps for e in r.episodes)]
                         for r in (self.per_task[t] for t in self.tasks)], dtype=np.float64).reshape(-1, 3)

    def metrics(self, prefix: str = "rollout") -> dict[str, float]:
        return success_metrics(self.tasks, self.counts(), prefix)

    def table_markdown(self) -> str:
        """Markdown table: one row per task and a mean row."""
        lines = [f"Policy `{self.policy}`", "",
                 "| task | success | successes / episodes | mean length | failure reasons |",
                 "|---|---:|---:|---:|---|"]
        for t in self.tasks:
            r = self.per_task[t]
            reasons = ", ".join(f"{k} ({v})" for k, v in r.failure_reasons.items()) or "-"
            lines.append(f"| {t} | {100 * r.success_rate:.1f}% | {r.successes} / {r.n} | {r.mean_length:.1f} | "
                         f"{reasons} |")
        n = sum(r.n for r in self.per_task.values())
        succ = sum(r.successes for r in self.per_task.values())
        mean_len = np.mean([e.steps for e in self.episodes]) if n else float("nan")
        lines.append(f"| **mean** | **{100 * self.mean_success:.1f}%** | {succ} / {n} | {mean_len:.1f} | |")
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path | None = None) -> str:
        """Per-task CSV (task, episodes, successes, success_rate, mean_length, failure_reasons,
        then the mean policy stats); written to ``path`` when given; returns the text."""
        stat_keys = sorted({k for r in self.per_task.values() for k in r.mean_stats})
        rows = [["task", "episodes", "successes", "success_rate", "mean_length", "failure_reasons", *stat_keys]]
        for t in self.tasks:
            r = self.per_task[t]
            reasons = "; ".join(f"{k}={v}" for k, v in r.failure_reasons.items())
            stats = r.mean_stats
            rows.append([t, r.n, r.successes, f"{r.success_rate:.4f}", f"{r.mean_length:.2f}", reasons,
                         *(f"{stats.get(k, 0.0):.3f}" for k in stat_keys)])
        return _write_csv(rows, path)

    def episodes_csv(self, path: str | Path | None = None) -> str:
        """Per-episode CSV (task, seed, success, steps, failure, detail, policy stats)."""
        stat_keys = sorted({k for e in self.episodes for k in e.stats})
        rows = [["task", "seed", "success", "steps", "failure", "detail", *stat_keys]]
        for e in self.episodes:
            rows.append([e.task, e.seed, int(e.success), e.steps, e.failure, e.detail,
                         *(f"{e.stats.get(k, 0.0):g}" for k in stat_keys)])
        return _write_csv(rows, path)


def _write_csv(rows: list[list], path) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(buf.getvalue())
    return buf.getvalue()


# ---------------------------------------------------------------------------- one episode
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


def run_episode(env, policy: Policy, seed: int, *, max_steps: int | None = None, stop_on_success: bool = True,
                record_video: bool = False) -> tuple[EpisodeResult, Video | None]:
    """Roll out ``policy`` in ``env`` (an env of ``envs.make_env``) for ``seed``."""
    from envs.tabletop import observation_arrays

    base = env.unwrapped
    seed_everything(seed)
    obs, _ = env.reset(seed=seed)
    policy.attach(base)
    policy.reset(base.task_name, base.prompt())
    cap = int(max_steps or base.max_steps)
    frames, captions = [], []
    steps, success, failure, detail = 0, False, "", ""
    try:
        while steps < cap and not policy.finished:
            observation = observation_arrays(obs)
            action = np.asarray(policy.act(observation), dtype=np.float32)
            if action.shape != (7,) or not np.all(np.isfinite(action)):
                raise PolicyFailure("invalid action", f"shape {action.shape}, finite: {np.isfinite(action).all()}")
            if record_video:
                frames.append(observation["base_rgb"])
                captions.append(f"{steps:3d} {policy.instruction}")
            obs, _, _, _, info = env.step(action)
            steps += 1
            success = bool(info["success"])
            if success and stop_on_success:
                break
    except PolicyFailure as e:
        success, failure, detail = False, e.reason, e.detail
    if not success and not failure:
        failure = "step cap" if steps >= cap else "stopped without success"
        detail = f"{cap} steps" if steps >= cap else f"policy finished after {steps} steps"
    result = EpisodeResult(base.task_name, int(seed), success, steps, failure, detail, dict(policy.stats()))
    video = None
    if record_video:
        frames.append(observation_arrays(obs)["base_rgb"])
        captions.append("SUCCESS" if success else f"FAIL: {failure} {detail}")
        video = Video(base.task_name, int(seed), success, np.stack(frames), captions)
    return result, video


# ---------------------------------------------------------------------------- environments
_ENVS: OrderedDict = OrderedDict()


def cached_env(task: str, image_size: int, backend: str = "auto"):
    """An env of ``task`` from this process's small LRU cache (creating one takes seconds)."""
    import envs

    key = (task, int(image_size), backend)
    if key in _ENVS:
        _ENVS.move_to_end(key)
        return _ENVS[key]
    while len(_ENVS) >= MAX_CACHED_ENVS:
        _, old = _ENVS.popitem(last=False)
        old.close()
    _ENVS[key] = envs.make_env(task, image_size=image_size, backend=backend)
    return _ENVS[key]


def close_cached_envs() -> None:
    while _ENVS:
        _ENVS.popitem()[1].close()


# ---------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(spec: PolicySpec, env_cfg: dict, threads: int) -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it cancels the rest)
    torch.set_num_threads(threads)
    _WORKER.update(policy=build_policy(spec), **env_cfg)


def _worker_episode(task: str, seed: int, record_video: bool):
    env = cached_env(task, _WORKER["image_size"], _WORKER["backend"])
    return run_episode(env, _WORKER["policy"], seed, max_steps=_WORKER["max_steps"],
                       stop_on_success=_WORKER["stop_on_success"], record_video=record_video)


# ---------------------------------------------------------------------------- evaluate
def evaluate(policy: PolicySpec | Policy, tasks, episodes: int = DEFAULT_EPISODES, *, seeds=None,
             seed_start: int = DEFAULT_SEED_START, workers: int = 0, image_size: int = 128,
             backend: str = "auto", max_steps: int | None = None, stop_on_success: bool = True,
             video_episodes: int = 1, rank: int = 0, world_size: int = 1, progress: bool = False) -> EvalResult:
    """Evaluate ``policy`` on ``tasks`` (names or a selection like ``"L0+L1"``).

    ``seeds`` (a list) overrides ``episodes``/``seed_start``. This call runs the shard
    ``seeds[rank::world_size]``. ``workers=0``: in this process (``policy`` may be a live
    :class:`~policies.base.Policy`; the global RNG states are restored afterwards); ``workers>0``:
    that many spawned processes (``policy`` must be a :class:`~policies.spec.PolicySpec`).
    ``image_size`` must match what the policy was trained on.
    """
    from envs import resolve_tasks

    tasks = resolve_tasks(tasks)
    all_seeds = [int(s) for s in seeds] if seeds is not None else evaluation_seeds(episodes, seed_start)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    shard = all_seeds[rank::world_size]
    jobs = [(task, seed, i < video_episodes) for task in tasks for i, seed in enumerate(shard)]
    label = policy.label if isinstance(policy, PolicySpec) else policy.kind
    env_cfg = {"image_size": int(image_size), "backend": backend, "max_steps": max_steps,
               "stop_on_success": bool(stop_on_success)}
    start = time.time()
    if workers > 0:
        if not isinstance(policy, PolicySpec):
            raise TypeError("workers > 0 needs a picklable PolicySpec, not a live policy")
        policy.validate()
        outcomes = _run_parallel(policy, jobs, env_cfg, workers, progress)
    else:
        outcomes = _run_here(policy, jobs, env_cfg, progress)
    per_task = {t: TaskResult(t, []) for t in tasks}
    videos = []
    for result, video in outcomes:
        per_task[result.task].episodes.append(result)
        if video is not None:
            videos.append(video)
    return EvalResult(label, tasks, per_task, videos, time.time() - start, rank, world_size)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="ep", dynamic_ncols=True)


def _run_here(policy, jobs, env_cfg: dict, progress: bool) -> list:
    if isinstance(policy, PolicySpec):
        policy = build_policy(policy)
    outcomes = []
    with preserved_rng(), _progress(len(jobs), progress, "rollouts") as bar:
        for task, seed, record in jobs:
            env = cached_env(task, env_cfg["image_size"], env_cfg["backend"])
            outcomes.append(run_episode(env, policy, seed, max_steps=env_cfg["max_steps"],
                                        stop_on_success=env_cfg["stop_on_success"], record_video=record))
            bar.update()
    return outcomes


def _run_parallel(spec: PolicySpec, jobs, env_cfg: dict, workers: int, progress: bool) -> list:
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(spec, env_cfg, threads)) as pool, \
            _progress(len(jobs), progress, f"rollouts ({workers} workers)") as bar:
        futures = [pool.submit(_worker_episode, *job) for job in jobs]
        outcomes = []
        try:
            for fut in futures:  # in job order: results do not depend on completion order
                outcomes.append(fut.result())
                bar.update()
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)  # the running episodes end, no new ones start
            raise
    return outcomes


__all__ = ["DEFAULT_SEED_START", "DEFAULT_EPISODES", "EpisodeResult", "Video", "TaskResult", "EvalResult",
           "evaluate", "evaluation_seeds", "run_episode", "success_metrics", "cached_env", "close_cached_envs",
           "preserved_rng", "seed_everything"]
