"""Parallel, resumable oracle data generation (``make data``).

Seeds ``seed_start, seed_start+1, ...`` are solved by the task's oracle in worker processes
(spawn, one env per process and task). Successful episodes are written as atomic episode
files; failed seeds leave a small ``.failed`` marker with the reason, so a rerun neither
repeats nor duplicates work. A task is complete when the first ``episodes`` successful seeds
(in seed order) are on disk; the index keeps exactly those, so reruns and different worker
counts give the same dataset.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from configs.errors import UserError

from . import schema
from .labels import step_labels


class DataWriteError(UserError, OSError):
    """An episode could not be written (disk full, quota, permissions); nothing half-written stays."""

_WORKER_ENVS: dict = {}
_WORKER_CFG: dict = {}


def _init_worker(env_cfg: dict, out: str) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: running episodes finish, atomically
    _WORKER_CFG.update(env=env_cfg, out=out)


def _worker_env(task: str):
    import envs

    if task not in _WORKER_ENVS:
        for old in _WORKER_ENVS.values():
            old.close()
        _WORKER_ENVS.clear()
        _WORKER_ENVS[task] = envs.make_env(task, image_size=_WORKER_CFG["env"]["image_size"],
                                           backend=_WORKER_CFG["env"]["backend"])
    return _WORKER_ENVS[task]


def solve_and_write(task: str, seed: int) -> tuple[str, int, bool, str, int]:
    """Worker job: run the oracle for ``seed`` and write its file (or a .failed marker)."""
    from envs.oracle import run_oracle
    from envs.tabletop import observation_arrays

    env = _worker_env(task)
    ep = run_oracle(env, seed, record_obs=True)
    folder = Path(_WORKER_CFG["out"]) / task
    name = schema.episode_name(seed)
    if not ep.success:
        folder.mkdir(parents=True, exist_ok=True)
        schema.atomic_write_text(folder / f"{name}.failed", ep.failure + "\n")
        return task, seed, False, ep.failure, len(ep)
    frames = [observation_arrays(o) for o in ep.observations]
    stacked = {k: np.stack([f[k] for f in frames]) for k in frames[0]}
    labels = step_labels([s.line for s in ep.steps], [s.key_step for s in ep.steps])
    schema.write_episode(folder / f"{name}.h5", ep, stacked, labels, [s.key_step for s in ep.steps],
                         np.array(ep.successes), [env.specs[n] for n in ep.objects], ep.pose_dict)
    return task, seed, True, "", len(ep)


def scan(folder: Path) -> tuple[set[int], dict[int, str]]:
    """Seeds already done in a task folder: successful (episode files) and failed (markers)."""
    ok, failed = set(), {}
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith("seed_") and p.suffix == ".h5":
                ok.add(int(p.stem[5:]))
            elif p.name.startswith("seed_") and p.suffix == ".failed":
                failed[int(p.stem[5:])] = p.read_text().strip()
    return ok, failed


def generate(cfg, tasks: list[str], progress: bool = True) -> dict:
    """Generate ``cfg.episodes`` successful episodes per task; returns the manifest dict."""
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    env_cfg = {"image_size": int(cfg.env.image_size), "backend": str(cfg.env.backend)}
    manifest = {"format": schema.FORMAT, "version": schema.VERSION, "generator": dict(
        seed_start=int(cfg.seed_start), episodes=int(cfg.episodes), env=env_cfg), "tasks": {}}
    workers = max(1, int(cfg.workers))
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(env_cfg, str(out))) as pool:
        try:
            for task in tasks:
                manifest["tasks"][task] = _generate_task(pool, workers, cfg, out, task, progress, tqdm)
                schema.atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)  # no new seeds start
            raise
    return manifest


def _generate_task(pool, workers, cfg, out: Path, task: str, progress: bool, tqdm) -> dict:
    target = int(cfg.episodes)
    first = int(cfg.seed_start)
    last = first + target * int(cfg.max_seeds_factor)  # exclusive
    ok, failed = scan(out / task)
    ok = {s for s in ok if first <= s < last}
    failed = {s: r for s, r in failed.items() if first <= s < last}

    def kept() -> list[int]:
        # the first `target` successes, valid once every seed below the last is decided
        return sorted(ok)[:target]

    def complete() -> bool:
        k = kept()
        if len(k) < target:
            return False
        return all(s in ok or s in failed for s in range(first, k[-1] + 1))

    bar = tqdm(total=target, desc=f"{task:>12}", unit="ep", disable=not progress, dynamic_ncols=True)
    bar.update(min(len(kept()), target))
    start, new_steps, new_eps = time.time(), 0, 0
    todo = (s for s in range(first, last) if s not in ok and s not in failed)
    running = {}
    try:
        while True:
            while len(running) < workers and not complete():
                seed = next(todo, None)
                if seed is None:
                    break
                if len([s for s in ok if s < seed]) >= target:
                    break  # enough successes below this seed
                running[pool.submit(solve_and_write, task, seed)] = seed
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                seed = running.pop(fut)
                try:
                    _, seed, success, reason, steps = fut.result()
                except BrokenProcessPool:  # killed: out of memory, a file-size limit, a signal
                    raise DataWriteError(
                        f"a worker died abruptly on {task} seed {seed} (out of memory, a file-size limit or a "
                        f"signal); rerun the same command: the {len(ok)} episodes already written are kept") from None
                except OSError as e:  # a full disk, a quota, permissions: the episode file was not written
                    raise DataWriteError(
                        f"cannot write {task} seed {seed} under {out}: {e}; free space (or fix the folder) and "
                        f"rerun the same command: the {len(ok)} episodes already written are kept") from None
                new_eps += 1
                new_steps += steps
                if success:
                    ok.add(seed)
                else:
                    failed[seed] = reason
                bar.n = min(len(kept()), target)
                hours = max(time.time() - start, 1e-6) / 3600
                tried = len(ok) + len(failed)
                bar.set_postfix(success=f"{len(ok) / max(tried, 1):.0%}", eps_per_h=f"{new_eps / hours:.0f}")
                bar.refresh()
    finally:
        bar.close()  # also before an error: its line comes after the bar, not under it
    seeds = kept()
    schema.write_index(out / f"{task}.h5", task, seeds)
    if seeds:
        from .stats import compute_stats

        compute_stats(out / f"{task}.h5")
    tried = sorted(s for s in list(ok) + list(failed) if s <= (seeds[-1] if seeds else last))
    reasons: dict[str, int] = {}
    for s in tried:
        if s in failed:
            reasons[failed[s]] = reasons.get(failed[s], 0) + 1
    n_fail = sum(reasons.values())
    info = {"episodes": len(seeds), "target": target, "seeds": seeds, "seeds_tried": len(tried),
            "failures": n_fail, "failure_reasons": reasons,
            "success_rate": (len(tried) - n_fail) / max(len(tried), 1)}
    if len(seeds) < target:
        info["incomplete"] = f"only {len(seeds)} successes in seeds [{first}, {last})"
    return info
