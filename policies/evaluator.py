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
``workers=N`` runs N spawned worker processes (never fork), each building its own policies from
the picklable :class:`~policies.spec.PolicySpec`. ``envs_per_worker=B`` steps B environments in
each process (in this one with ``workers=0``), one policy per environment sharing the networks,
and sends their VLM queries and DP chunk requests to the networks as batches
(:func:`policies.episodes.run_batched`); a slot whose episode ends takes the next job (workers
take jobs from one shared queue). With B = 1 each process runs one episode at a time, as
:func:`run_episode` does. Seeds can be sharded over ranks: rank r of w runs ``seeds[r::w]`` (the
rollout callback does this under DDP); :meth:`EvalResult.counts` are summed over ranks to get
the totals.

Resuming. ``done`` maps ``(task, seed)`` to the :class:`EpisodeResult` of an episode finished
earlier (``make eval`` keeps them in ``<out>/episodes.jsonl``): those jobs are not run again and
their results are used as they are (without video). ``on_episode(result)`` is called in this
process as each newly run episode finishes, so a caller can record it before the next one ends.

Episodes (:mod:`policies.episodes`). Each runs until the task is solved (``stop_on_success``),
the policy has nothing more to do (``done()`` of code-executing policies), it raises
:class:`~policies.base.PolicyFailure`, or the step cap (``max_steps``, default the task's own:
``env.max_steps``) is reached. Failure reasons: ``step cap``, ``stopped without success``, or
the PolicyFailure's reason. The first ``video_episodes`` episodes of each task (in this rank's
shard) are recorded as base-camera videos whose captions carry the policy's current instruction.
"""

from __future__ import annotations

import csv
import io
import os
import queue
import time
from collections import Counter
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from configs.workers import SPAWN, spawn_pool

from .base import Policy
from .episodes import (EpisodeResult, Video, cached_env, close_cached_envs, frozen_gc, preserved_rng, run_batched,
                       run_episode, seed_everything)
from .spec import PolicySpec, build_policies, build_policy

DEFAULT_SEED_START = 100_000
DEFAULT_EPISODES = 64  # paper: 64 seeds per task


def evaluation_seeds(episodes: int = DEFAULT_EPISODES, seed_start: int = DEFAULT_SEED_START) -> list[int]:
    """The fixed evaluation seeds: ``seed_start, seed_start + 1, ...`` (``episodes`` of them)."""
    return list(range(int(seed_start), int(seed_start) + int(episodes)))


# ---------------------------------------------------------------------------- results
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


class EpisodeJournal:
    """Finished episodes of one evaluation, one JSON line each, so that a rerun resumes.

    The first line is a fingerprint of what is evaluated (policy, options, checkpoints, episode
    settings); a journal with another fingerprint is started afresh. A line cut short by a kill
    is ignored. ``done()`` gives what :func:`evaluate` takes as ``done``; ``add`` is its
    ``on_episode``.
    """

    def __init__(self, path: str | Path, fingerprint: dict):
        import json

        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self._done: dict[tuple[str, int], EpisodeResult] = {}
        text = self.path.read_text() if self.path.exists() else ""
        if text and not text.endswith("\n"):  # a line cut short by a kill: dropped, so the next one starts clean
            text = text[:text.rfind("\n") + 1]
            self.path.write_text(text)
        lines = text.splitlines()
        if lines and self._parse(lines[0]) == {"fingerprint": self.fingerprint}:
            for line in lines[1:]:
                entry = self._parse(line)
                if entry is not None:
                    result = EpisodeResult(**entry)
                    self._done[(result.task, int(result.seed))] = result
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"fingerprint": self.fingerprint}) + "\n")

    @staticmethod
    def _parse(line: str):
        import json

        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return None

    def done(self) -> dict[tuple[str, int], EpisodeResult]:
        return dict(self._done)

    def add(self, result: EpisodeResult) -> None:
        import dataclasses
        import json

        with open(self.path, "a") as f:
            f.write(json.dumps(dataclasses.asdict(result), default=lambda v: v.item()) + "\n")  # numpy scalars
        self._done[(result.task, int(result.seed))] = result


# ---------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(spec: PolicySpec, env_cfg: dict, threads: int, envs_per_worker: int, jobs=None, done=None) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER.update(policies=build_policies(spec, envs_per_worker), jobs=jobs, done=done, **env_cfg)
    import gc

    gc.freeze()  # the networks and libraries, for the worker's life (policies.episodes.frozen_gc says why)


def _worker_episode(task: str, seed: int, record_video: bool):
    policy = _WORKER["policies"][0]
    env = cached_env(task, _WORKER["image_size"], _WORKER["backend"], wrist_camera=_reads_wrist(policy))
    return run_episode(env, policy, seed, max_steps=_WORKER["max_steps"],
                       stop_on_success=_WORKER["stop_on_success"], record_video=record_video)


def _worker_batched(jobs: list) -> dict:
    """A worker's share of the jobs, B at a time: it takes job indices from the shared queue
    until it is empty and reports each finished one on the ``done`` queue."""
    def next_job():
        try:
            return _WORKER["jobs"].get_nowait()
        except queue.Empty:
            return None

    policies = _WORKER["policies"]
    return run_batched(policies, jobs, _slot_env(_WORKER, policies), max_steps=_WORKER["max_steps"],
                       stop_on_success=_WORKER["stop_on_success"], next_job=next_job,
                       on_result=lambda index, outcome: _WORKER["done"].put((index, outcome[0])))


def _slot_env(env_cfg: dict, policies: list):
    return lambda slot, task: cached_env(task, env_cfg["image_size"], env_cfg["backend"], slot=slot,
                                         wrist_camera=_reads_wrist(policies[slot]))


def _reads_wrist(policy) -> bool:
    """Whether ``policy`` reads ``wrist_rgb`` (:attr:`policies.base.Policy.reads_wrist`; unknown: yes)."""
    return bool(getattr(policy, "reads_wrist", True))


# ---------------------------------------------------------------------------- evaluate
def evaluate(policy: PolicySpec | Policy, tasks, episodes: int = DEFAULT_EPISODES, *, seeds=None,
             seed_start: int = DEFAULT_SEED_START, workers: int = 0, envs_per_worker: int = 1, image_size: int = 128,
             backend: str = "auto", max_steps: int | None = None, stop_on_success: bool = True,
             video_episodes: int = 1, rank: int = 0, world_size: int = 1, progress: bool = False,
             done: dict | None = None, on_episode=None) -> EvalResult:
    """Evaluate ``policy`` on ``tasks`` (names or a selection like ``"L0+L1"``).

    ``seeds`` (a list) overrides ``episodes``/``seed_start``. This call runs the shard
    ``seeds[rank::world_size]``. ``workers=0``: in this process (``policy`` may be a live
    :class:`~policies.base.Policy`; the global RNG states are restored afterwards); ``workers>0``:
    that many spawned processes (``policy`` must be a :class:`~policies.spec.PolicySpec`).
    ``envs_per_worker`` (B): environments stepped side by side in each process (this one when
    ``workers=0``), their policies' VLM queries and DP chunks sent to the networks as batches
    (:func:`policies.episodes.run_batched`; B > 1 needs a PolicySpec). With B = 1 each episode
    runs alone, as :func:`run_episode` runs it. ``image_size`` must match what the policy was
    trained on. ``done`` and ``on_episode``: resuming (module docstring).
    """
    from envs import resolve_tasks

    tasks = resolve_tasks(tasks)
    all_seeds = [int(s) for s in seeds] if seeds is not None else evaluation_seeds(episodes, seed_start)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if envs_per_worker < 1:
        raise ValueError(f"envs_per_worker={envs_per_worker} must be >= 1")
    shard = all_seeds[rank::world_size]
    all_jobs = [(task, seed, i < video_episodes) for task in tasks for i, seed in enumerate(shard)]
    done = done or {}
    jobs = [job for job in all_jobs if (job[0], job[1]) not in done]
    on_episode = on_episode or (lambda result: None)
    label = policy.label if isinstance(policy, PolicySpec) else policy.kind
    env_cfg = {"image_size": int(image_size), "backend": backend, "max_steps": max_steps,
               "stop_on_success": bool(stop_on_success)}
    start = time.time()
    if (workers > 0 or envs_per_worker > 1) and not isinstance(policy, PolicySpec):
        raise TypeError("workers > 0 or envs_per_worker > 1 needs a picklable PolicySpec, not a live policy")
    if not jobs:
        outcomes = []
    elif workers > 0:
        policy.validate()
        outcomes = _run_parallel(policy, jobs, env_cfg, workers, int(envs_per_worker), progress, on_episode)
    else:
        outcomes = _run_here(policy, jobs, env_cfg, int(envs_per_worker), progress, on_episode)
    found = {(result.task, result.seed): (result, video) for result, video in outcomes}
    per_task = {t: TaskResult(t, []) for t in tasks}
    videos = []
    for task, seed, _ in all_jobs:  # in job order, whether run now or before
        result, video = found.get((task, seed)) or (done[(task, seed)], None)
        per_task[task].episodes.append(result)
        if video is not None:
            videos.append(video)
    return EvalResult(label, tasks, per_task, videos, time.time() - start, rank, world_size)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="ep", dynamic_ncols=True)


def _run_here(policy, jobs, env_cfg: dict, envs_per_worker: int, progress: bool, on_episode) -> list:
    if envs_per_worker > 1:
        policies = build_policies(policy, envs_per_worker)
    elif isinstance(policy, PolicySpec):
        policy = build_policy(policy)
    with preserved_rng(), frozen_gc(), _progress(len(jobs), progress, "rollouts") as bar:
        if envs_per_worker > 1:
            def finished(_, outcome):
                on_episode(outcome[0])
                bar.update()

            found = run_batched(policies, jobs, _slot_env(env_cfg, policies), max_steps=env_cfg["max_steps"],
                                stop_on_success=env_cfg["stop_on_success"], on_result=finished)
            return [found[i] for i in range(len(jobs))]
        outcomes = []
        for task, seed, record in jobs:
            env = cached_env(task, env_cfg["image_size"], env_cfg["backend"], wrist_camera=_reads_wrist(policy))
            outcomes.append(run_episode(env, policy, seed, max_steps=env_cfg["max_steps"],
                                        stop_on_success=env_cfg["stop_on_success"], record_video=record))
            on_episode(outcomes[-1][0])
            bar.update()
    return outcomes


def worker_threads(workers: int) -> int:
    """Torch threads per evaluation worker: ``OMP_NUM_THREADS`` when it is set to a positive integer,
    else the cores shared among the ``workers``. Set ``OMP_NUM_THREADS=1`` for evaluations run side by
    side: each of them sees an idle machine, and OpenMP threads that wait on cores another process holds
    cost far more than they bring (two one-worker image-DP evaluations at 2 threads each ran about ten
    times slower per episode on 2 cores, sessions 20-21)."""
    try:
        asked = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        asked = 0
    return asked if asked > 0 else max(1, (os.cpu_count() or 1) // max(1, workers))


def _run_parallel(spec: PolicySpec, jobs, env_cfg: dict, workers: int, envs_per_worker: int, progress: bool,
                  on_episode) -> list:
    threads = worker_threads(workers)
    batched = envs_per_worker > 1
    todo, done = (SPAWN.Queue(), SPAWN.Queue()) if batched else (None, None)
    desc = f"rollouts ({workers} workers" + (f" x {envs_per_worker} envs)" if batched else ")")
    with spawn_pool(workers, _init_worker, (spec, env_cfg, threads, envs_per_worker, todo, done)) as pool, \
            _progress(len(jobs), progress, desc) as bar:
        try:
            if not batched:
                futures = [pool.submit(_worker_episode, *job) for job in jobs]
                for fut in as_completed(futures):
                    on_episode(fut.result()[0])
                    bar.update()
                return [fut.result() for fut in futures]  # in job order: results do not depend on completion order
            for index in range(len(jobs)):
                todo.put(index)
            futures = [pool.submit(_worker_batched, jobs) for _ in range(workers)]
            reported = set()
            while not all(f.done() for f in futures):
                try:
                    index, result = done.get(timeout=0.5)
                except queue.Empty:
                    continue
                reported.add(index)
                on_episode(result)
                bar.update()
            found = {}
            for fut in futures:
                found.update(fut.result())
            for index in sorted(set(found) - reported):  # reports still in the queue's pipe
                on_episode(found[index][0])
                bar.update()
            return [found[i] for i in range(len(jobs))]  # in job order, whichever worker ran it
        except KeyboardInterrupt:
            if batched:  # no new episodes: the workers end their running ones and return
                while True:
                    try:
                        todo.get_nowait()
                    except queue.Empty:
                        break
            pool.shutdown(wait=False, cancel_futures=True)  # the running episodes end, no new ones start
            raise


__all__ = ["DEFAULT_SEED_START", "DEFAULT_EPISODES", "EpisodeResult", "Video", "TaskResult", "EvalResult", "EpisodeJournal",
           "evaluate", "evaluation_seeds", "run_episode", "success_metrics", "cached_env", "close_cached_envs",
           "preserved_rng", "seed_everything", "worker_threads"]
