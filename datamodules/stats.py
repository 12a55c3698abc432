"""Normalisation statistics of actions and proprioception, computed once per task file.

``<OUT>/<Task>.stats.json`` holds, per key, count/mean/std/min/max over every step of the
indexed episodes; :func:`load_stats` combines several task files into dataset statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import schema

STAT_KEYS = {"actions": "actions", "qpos": "obs/qpos", "qvel": "obs/qvel", "tcp_pose": "obs/tcp_pose"}


def stats_path(index_path: Path) -> Path:
    return Path(index_path).with_suffix(".stats.json")


def compute_stats(index_path: Path) -> dict:
    """Per-key statistics over all steps of all episodes of one task file; writes the sidecar."""
    acc = {k: [] for k in STAT_KEYS}
    with schema.open_index(index_path) as f:
        for name in f["episodes"]:
            ep = f["episodes"][name]
            for k, key in STAT_KEYS.items():
                acc[k].append(ep[key][:].astype(np.float64))
    out = {}
    for k, parts in acc.items():
        if not parts:
            continue
        x = np.concatenate(parts)
        out[k] = {"count": int(len(x)), "mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
                  "min": x.min(0).tolist(), "max": x.max(0).tolist()}
    schema.atomic_write_text(stats_path(index_path), json.dumps(out, indent=1))
    return out


def load_stats(index_paths) -> dict[str, dict[str, np.ndarray]]:
    """Combined statistics of several task files (pooled mean/std, global min/max); a
    :class:`~datamodules.schema.SchemaError` when their widths differ (different robots)."""
    index_paths = list(index_paths)
    per_file = []
    for p in index_paths:
        sp = stats_path(p)
        per_file.append(json.loads(sp.read_text()) if sp.exists() else compute_stats(p))
    for k in STAT_KEYS:  # e.g. our Panda (qpos 7) and ClevrSkills' xArm6 (qpos 11) in one training
        widths = {len(s[k]["mean"]) for s in per_file if k in s}
        if len(widths) > 1:
            raise schema.SchemaError(f"{k} has different widths {sorted(widths)} across "
                                     f"{[str(p) for p in index_paths]}: datasets of different robots cannot be "
                                     f"normalised (or trained) together")
    out = {}
    for k in STAT_KEYS:
        parts = [s[k] for s in per_file if k in s]
        n = np.array([p["count"] for p in parts], dtype=np.float64)
        means = np.array([p["mean"] for p in parts])
        stds = np.array([p["std"] for p in parts])
        mean = (n[:, None] * means).sum(0) / n.sum()
        var = (n[:, None] * (stds ** 2 + (means - mean) ** 2)).sum(0) / n.sum()
        out[k] = {"mean": mean, "std": np.sqrt(var), "min": np.min([p["min"] for p in parts], 0),
                  "max": np.max([p["max"] for p in parts], 0), "count": n.sum()}
    return out
