"""``make import-clevrskills``: a tree of ClevrSkills trajectory folders -> a dataset of our schema.

The output folder is a dataset like the one ``make data`` writes (``<OUT>/<Task>.h5`` indexes,
``<OUT>/<Task>/seed_<n>.h5`` episode files, ``<Task>.stats.json``, ``manifest.json``), so
``OracleStepDataset``, ``make train-dp``, ``make train-vlm``, ``make relabel-dp`` and
``make check-data`` read it unchanged.

* **Episode numbers.** Trajectory ``n`` of ``<OUT>/sources.json`` (the relative paths under SRC, in
  sorted order; paths found by a later run are appended) becomes ``seed_<n>``: ClevrSkills' own
  seeds repeat across its folders (``touch/traj_42``, ``touch_push/traj_42``). Its seed, variant and
  path are the episode attributes ``source_seed``, ``source_variant``, ``source_path``.
* **Crash-safe and resumable** like ``make data``: each episode file is written to a temporary
  name and renamed; a trajectory that cannot be imported leaves ``<OUT>/skipped/seed_<n>.failed``
  with the reason (delete it to try again). A rerun of the same command does only what is missing
  and then rewrites the indexes, the statistics and the manifest, which therefore come out the same
  however often the import was interrupted.
* **Skips, not crashes.** A missing file, an undecodable or truncated video, a solver with no
  mapping, an unknown task prompt, a trajectory that never succeeds: each is recorded in
  ``manifest.json`` (``skipped_trajectories``: path -> reason, ``skip_reasons``: reason -> count,
  numbers written N).
  A source folder holding no ClevrSkills trajectory at all is one error (exit 2).
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from configs.errors import ConfigError, MissingInputError
from configs.workers import spawn_pool

from .. import schema
from ..generate import DataWriteError, scan
from .convert import ASPECTS, LEVELS, Settings, convert, write
from .source import TrajectoryError, find_trajectories

SOURCES = "sources.json"
SKIPPED = "skipped"
NOT_TASK_DIRS = (SKIPPED, "quarantine")


def settings_of(cfg) -> Settings:
    """Validated :class:`Settings` from an ``import_clevrskills`` config."""
    if cfg.level not in LEVELS:
        raise ConfigError(f"LEVEL={cfg.level}: use one of {list(LEVELS)}")
    if cfg.aspect not in ASPECTS:
        raise ConfigError(f"aspect={cfg.aspect}: use one of {list(ASPECTS)}")
    names = tuple(sorted((str(k), str(v)) for k, v in (cfg.task_names or {}).items()))
    return Settings(level=str(cfg.level), image_size=int(cfg.image_size), aspect=str(cfg.aspect),
                    task=str(cfg.task) if cfg.task else None, task_names=names)


def _settings_record(s: Settings) -> dict:
    return {"level": s.level, "image_size": s.image_size, "aspect": s.aspect, "task": s.task,
            "task_names": dict(s.task_names)}


def assign_episodes(out: Path, src: Path, rels: list[str], settings: Settings) -> list[str]:
    """The trajectory of each episode number (``sources.json``); new paths are appended. An output
    folder written from another SRC or with other settings is refused (its episodes would mix)."""
    path = out / SOURCES
    record = _settings_record(settings)
    known: list[str] = []
    if not path.exists() and "importer" not in schema.read_manifest(out) and (out / "manifest.json").exists():
        raise ConfigError(f"OUT={out} holds a dataset written by `make data`; import into another folder")
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("src") != str(src.resolve()) or old.get("settings") != record:
            raise ConfigError(f"OUT={out} holds an import of {old.get('src')} with {old.get('settings')}; this "
                              f"one is {src.resolve()} with {record}: use another OUT (or the same SRC and "
                              f"settings to resume)")
        known = list(old["trajectories"])
    seen = set(known)
    order = known + [r for r in rels if r not in seen]
    if order != known or not path.exists():
        schema.atomic_write_text(path, json.dumps({"src": str(src.resolve()), "settings": record,
                                                   "trajectories": order}, indent=1))
    return order


def import_one(src: str, rel: str, seed: int, out: str, settings: Settings) -> tuple[int, str | None, str, int]:
    """Worker job: convert one trajectory and write its episode file, or its skip marker.
    Returns (seed, task or None when skipped, skip reason, steps)."""
    name = schema.episode_name(seed)
    try:
        c = convert(Path(src) / rel, seed, rel, settings)
    except TrajectoryError as e:
        reason = str(e)
    except (KeyError, IndexError, TypeError, ValueError) as e:  # a trace or array of unexpected layout
        reason = f"malformed data ({type(e).__name__}: {e})"
    else:
        write(Path(out) / c.episode.task / f"{name}.h5", c)
        return seed, c.episode.task, "", len(c.episode)
    folder = Path(out) / SKIPPED
    folder.mkdir(parents=True, exist_ok=True)
    schema.atomic_write_text(folder / f"{name}.failed", reason.replace("\n", " ") + "\n")
    return seed, None, reason, 0


def _init_worker() -> None:  # Ctrl-C is the parent's (configs.workers): running jobs finish atomically
    import torch

    torch.set_num_threads(1)


def existing(out: Path) -> tuple[dict[int, str], dict[int, str]]:
    """({seed: task} of the episode files already written, {seed: reason} of the skip markers)."""
    done: dict[int, str] = {}
    for d in sorted(out.iterdir()):
        if d.is_dir() and d.name not in NOT_TASK_DIRS:
            done.update({s: d.name for s in scan(d)[0]})
    return done, scan(out / SKIPPED)[1]


def run_import(cfg, progress: bool = True) -> dict:
    """Import every trajectory under ``cfg.src`` into ``cfg.out``; returns the manifest."""
    from tqdm import tqdm

    settings = settings_of(cfg)
    if not cfg.src:
        raise ConfigError("give the ClevrSkills folder: make import-clevrskills SRC=<folder> OUT=<folder>")
    src, out = Path(cfg.src), Path(cfg.out)
    if not src.is_dir():
        raise MissingInputError(f"SRC={src}: no such folder")
    rels = find_trajectories(src)
    out.mkdir(parents=True, exist_ok=True)
    order = assign_episodes(out, src, rels, settings)
    present = set(rels)
    done, skipped = existing(out)
    todo = [(seed, rel) for seed, rel in enumerate(order)
            if rel in present and seed not in done and seed not in skipped]
    workers = max(1, int(cfg.workers))
    bar = tqdm(total=len(order), initial=len(order) - len(todo), desc="import", unit="traj",
               disable=not progress, dynamic_ncols=True)
    start, count = time.time(), 0

    def record(result) -> None:
        nonlocal count
        seed, task, reason, _ = result
        if task is None:
            skipped[seed] = reason
        else:
            done[seed] = task
        count += 1
        bar.update(1)
        bar.set_postfix(skipped=len(skipped), traj_per_min=f"{count / max(time.time() - start, 1e-6) * 60:.0f}")

    try:
        if workers == 1:  # in this process: no start-up cost, Ctrl-C stops between trajectories
            for seed, rel in todo:
                record(_guarded(import_one, str(src), rel, seed, str(out), settings))
        else:
            _run_pool(todo, workers, src, out, settings, record)
    finally:
        bar.close()
    return finish(out, src, order, present, settings)


def _guarded(fn, *args):
    try:
        return fn(*args)
    except OSError as e:  # a full disk, a quota, permissions: the episode file was not written
        raise DataWriteError(f"cannot write under {args[3]}: {e}; free space (or fix the folder) and rerun the "
                             f"same command: what was written is kept") from None


def _run_pool(todo, workers, src: Path, out: Path, settings: Settings, record) -> None:
    pending = iter(todo)
    with spawn_pool(workers, _init_worker) as pool:
        running: dict = {}
        try:
            while True:
                while len(running) < 2 * workers:
                    job = next(pending, None)
                    if job is None:
                        break
                    seed, rel = job
                    running[pool.submit(import_one, str(src), rel, seed, str(out), settings)] = job
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    seed, rel = running.pop(fut)
                    try:
                        record(fut.result())
                    except BrokenProcessPool:
                        raise DataWriteError(f"a worker died abruptly on {rel} (out of memory, a file-size limit or a "
                                             f"signal); rerun the same command: what was written is kept") from None
                    except OSError as e:
                        raise DataWriteError(f"cannot write {rel} under {out}: {e}; free space (or fix the folder) "
                                             f"and rerun the same command: what was written is kept") from None
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def finish(out: Path, src: Path, order: list[str], present: set[str], settings: Settings) -> dict:
    """Rewrite every task index, its statistics and the manifest from what is on disk."""
    from ..stats import compute_stats

    done, skipped = existing(out)
    tasks: dict[str, list[int]] = {}
    for seed, task in done.items():
        tasks.setdefault(task, []).append(seed)
    info = {}
    for task, seeds in sorted(tasks.items()):
        seeds.sort()
        schema.write_index(out / f"{task}.h5", task, seeds)
        compute_stats(out / f"{task}.h5")
        info[task] = {"episodes": len(seeds), "seeds": seeds}
    reasons = {order[s]: r for s, r in sorted(skipped.items()) if s < len(order)}
    reasons.update({rel: "no longer under SRC" for seed, rel in enumerate(order)
                    if rel not in present and seed not in done and seed not in skipped})
    counts: dict[str, int] = {}  # reasons that differ only in their numbers count together
    for r in reasons.values():
        kind = re.sub(r"\b\d+\b", "N", r)
        counts[kind] = counts.get(kind, 0) + 1
    manifest = {"format": schema.FORMAT, "version": schema.VERSION,
                "importer": {"source": "clevrskills", "src": str(src.resolve()), **_settings_record(settings)},
                "trajectories": len(order), "imported": len(done), "skipped": len(reasons),
                "tasks": info, "skip_reasons": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
                "skipped_trajectories": reasons}
    schema.atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
