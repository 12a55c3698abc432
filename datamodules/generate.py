"""Parallel, resumable data generation (``make data``).

Seeds ``seed_start, seed_start+1, ...`` are solved in worker processes (spawn, one env per
process and task) by the task's oracle, or with ``policy: vlm_oracle`` by VLM+Oracle (the paper's
Figure 6 dataset: a trained VLM plans the key-steps and the oracle skills execute them, as
``make eval POLICY=vlm_oracle`` runs it; the executed lines are the labels, in the same schema).
Successful episodes are written as atomic episode files; failed seeds leave a small ``.failed``
marker with the reason, so a rerun neither repeats nor duplicates work. A task is complete when
the first ``episodes`` successful seeds (in seed order) are on disk; the index keeps exactly
those, so reruns and different worker counts give the same dataset.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from configs.errors import ConfigError, MissingInputError, UserError
from configs.workers import spawn_pool

from . import schema
from .labels import step_labels

POLICIES = ("oracle", "vlm_oracle")  # who solves the seeds (``policy:`` of configs/data.yaml)


class DataWriteError(UserError, OSError):
    """An episode could not be written (disk full, quota, permissions); nothing half-written stays."""

_WORKER_ENVS: dict = {}
_WORKER_CFG: dict = {}


def _init_worker(env_cfg: dict, out: str, solver: dict | None = None) -> None:
    _WORKER_CFG.update(env=env_cfg, out=out, solver=solver or {"policy": "oracle"})
    if _WORKER_CFG["solver"]["policy"] == "vlm_oracle":
        import torch

        from policies.spec import resolve_device
        from policies.vlm_planner import VLMPlanner

        torch.set_num_threads(1)
        _WORKER_CFG["planner"] = VLMPlanner.from_pretrained(_WORKER_CFG["solver"]["vlm"], device=resolve_device("auto"))


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
    """Worker job: solve ``seed`` (oracle or VLM+Oracle) and write its file (or a .failed marker)."""
    from envs.oracle import ORACLE_VARIATIONS, not_as_scripted, oracle_variations, run_oracle
    from envs.tabletop import observation_arrays

    env = _worker_env(task)
    solver = _WORKER_CFG["solver"]
    if solver["policy"] == "vlm_oracle":
        ep = run_vlm_oracle(env, _WORKER_CFG["planner"], seed)
    else:  # the variations not as scripted (a solver without ranges runs as scripted)
        varied = not_as_scripted({n: solver[n] for n in ORACLE_VARIATIONS if n in solver})
        ep = run_oracle(env, seed, record_obs=True, **oracle_variations(seed, varied))
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


def run_vlm_oracle(env, planner, seed: int):
    """One VLM+Oracle episode recorded like an oracle episode (:class:`envs.oracle.Episode`, with
    observations): each step is labelled with the VLM line whose oracle skill produced the action.
    It ends after ``done()``, at the task's step cap, or on bad VLM code (a recorded failure)."""
    from envs.oracle import Episode, StepRecord
    from envs.tabletop import observation_arrays
    from policies.base import PolicyFailure
    from policies.episodes import seed_everything
    from policies.vlm_oracle import VLMOracle

    seed_everything(seed)  # as the evaluator seeds an episode
    obs, _ = env.reset(seed=seed)
    base = env.unwrapped
    policy = VLMOracle(planner)
    policy.attach(env)
    policy.reset(base.task_name, base.prompt())
    ep = Episode(task=base.task_name, seed=seed, prompt=base.prompt(), objects=list(base.specs), success=False)
    try:
        while not policy.finished:
            if len(ep.steps) >= base.max_steps:
                ep.failure = f"step cap {base.max_steps} reached"
                break
            action = policy.act(observation_arrays(obs))
            ep.steps.append(StepRecord(policy.executor.line, policy.executor.key_step))
            ep.actions.append(action)
            ep.observations.append(obs)
            obs, _, _, _, info = env.step(action)
            ep.successes.append(bool(info["success"]))
    except PolicyFailure as e:
        ep.failure = e.reason
    ep.pose_dict = {k: tuple(float(v) for v in pose.p) for k, pose in policy.executor.api.pose_dict.items()}
    ep.success = bool(ep.steps) and not ep.failure and bool(base.evaluate_success())
    if not ep.success and not ep.failure:
        ep.failure = "task not solved"
    return ep


def variation_range(name: str, value) -> tuple[float, float]:
    """``(lo, hi)`` of the oracle variation ``name`` (``envs.oracle.ORACLE_VARIATIONS``) from ``value``, a
    pair or its text (``"[0.6, 1.0]"``), checked against the variation's bounds (raises a user error)."""
    from envs.oracle import ORACLE_VARIATIONS

    lo, hi = ORACLE_VARIATIONS[name]["bounds"]
    if isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    try:
        pair = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not lo <= pair[0] <= pair[1] <= hi:
        raise ConfigError(f"{name}={value}: expected [lo, hi] with {lo} <= lo <= hi <= {hi}")
    return pair


def solver_config(cfg) -> dict:
    """``{"policy": ..., "vlm": ...}`` (or the oracle's variations, ``envs.oracle.ORACLE_VARIATIONS``:
    ``oracle_speed`` ... as [lo, hi]) of a data config, checked (raises a user error); a config
    without ``policy`` (a programmatic one) is the oracle's."""
    from envs.oracle import ORACLE_VARIATIONS, not_as_scripted

    policy = str(cfg.get("policy", "oracle"))
    if policy not in POLICIES:
        raise ConfigError(f"POLICY={policy}: data is generated by one of {list(POLICIES)}")
    ranges = {name: variation_range(name, cfg.get(name, [v["default"]] * 2))
              for name, v in ORACLE_VARIATIONS.items()}
    varied = not_as_scripted(ranges)
    if policy == "oracle":
        return {"policy": policy, **ranges}
    if varied:
        raise ConfigError(f"{next(iter(varied))} applies to POLICY=oracle only (POLICY={policy} runs the VLM's "
                          f"plan with the skills as scripted)")
    if not cfg.get("vlm"):
        raise ConfigError("POLICY=vlm_oracle needs VLM=<export folder of make train-vlm>")
    if not Path(cfg.vlm).exists():
        raise MissingInputError(f"VLM={cfg.vlm}: no such exported VLM folder; train one with `make train-vlm` "
                                f"(it writes <out>/export)")
    return {"policy": policy, "vlm": str(Path(cfg.vlm).resolve())}


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
    solver = solver_config(cfg)
    if solver["policy"] == "vlm_oracle":  # load it once here: a bad export is one error, not N broken workers
        from policies.vlm_planner import VLMPlanner

        VLMPlanner.from_pretrained(solver["vlm"], device="cpu")
    env_cfg = {"image_size": int(cfg.env.image_size), "backend": str(cfg.env.backend)}
    previous = schema.read_manifest(out)
    before = previous.get("generator", {})
    had = {"policy": before.get("policy", "oracle"), "vlm": before.get("vlm")}
    if previous and had != {"policy": solver["policy"], "vlm": solver.get("vlm")}:
        raise ConfigError(f"OUT={out} holds episodes made by {had['policy']}{' with VLM ' + had['vlm'] if had['vlm'] else ''}; "
                          f"pick a new OUT for POLICY={solver['policy']}")
    from envs.oracle import ORACLE_VARIATIONS

    for name, v in ORACLE_VARIATIONS.items():  # a folder keeps one setting of each variation
        had_range = [float(x) for x in before.get(name, [v["default"]] * 2)]
        if previous and solver["policy"] == "oracle" and had_range != list(solver[name]):
            raise ConfigError(f"OUT={out} holds episodes made with {name}={had_range}; "
                              f"pick a new OUT for {name}={list(solver[name])}")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": schema.FORMAT, "version": schema.VERSION, "generator": dict(
        seed_start=int(cfg.seed_start), episodes=int(cfg.episodes), env=env_cfg,
        **solver), "tasks": {}}
    if before.get("env") == env_cfg:  # the other tasks of the folder (an earlier command) stay listed
        manifest["tasks"] = {t: info for t, info in previous.get("tasks", {}).items() if t not in tasks}
    workers = max(1, int(cfg.workers))
    with spawn_pool(workers, _init_worker, (env_cfg, str(out), solver)) as pool:  # Ctrl-C: running episodes finish
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


def small_dataset(out, tasks: list[str], episodes: int, image_size: int = 64) -> Path:
    """``make data`` of ``episodes`` per task into ``out`` (for benchmarks that were given no data);
    returns ``out``. Run as a child process, so the caller never holds a simulator."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "scripts" / "generate_data.py"), f"OUT={out}", f"TASKS={','.join(tasks)}",
                    f"EPISODES={episodes}", f"env.image_size={image_size}"], check=True, capture_output=True, cwd=root)
    return Path(out)
