"""``make export-llava``: any of our datasets (generated or imported) as LLaVA training data.

LLaVA's conversation format, as its training scripts and ClevrSkills' own converter use it: a JSON
list of samples ``{"id", "image", "conversations": [{"from": "human", "value": ...}, {"from": "gpt",
"value": ...}]}``, where ``image`` is a path relative to the output folder (LLaVA's
``--image_folder``) and ``<image>`` marks the image in the human turn. Two extra keys say where a
sample comes from, as ClevrSkills' converter adds them: ``source`` (``<Task>/seed_<n>``) and
``object_conversation`` (true for grounding samples).

The questions are OUR VLM's (``datamodules.vqa``), so that another VLM stack learns the same task:

* code samples (``code_question``): ``Task: <prompt>\\nMemory:\\n<key-step lines before t, or
  None>\\n<image>[\\nPlease give a keystep reply]`` -> the step's line of ``label_set``. With
  ``frames: keysteps`` every key-step frame is one sample (with the key-step request when
  ``keystep_request``); ``frames: all`` adds every other step, without the request, answered with
  the running line ``# ``-commented, as our VLM learns it.
* grounding samples (``grounding`` per exported frame, seeded): ``Where is the red cube?\\n<image>``
  -> ``(x, y)`` on the ``grid``, ``Is there a red cube at (x, y)?`` -> yes / no (``datamodules.grounding``).

Files: ``<OUT>/llava.json`` (written last, atomically) and ``<OUT>/images/<Task>/seed_<n>_t<step>.<ext>``
(the base camera at the dataset's image size).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from configs.errors import ConfigError, MissingInputError

from . import schema
from .check import index_files
from .dataset import OracleStepDataset
from .grounding import vqa_samples
from .labels import is_key_step
from .vqa import code_question, grounding_question

FRAMES = ("keysteps", "all")
IMAGE_FORMATS = ("png", "jpg")


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def export_llava(data_dir, out, tasks: list[str] | None = None, label_set: str = "oracle",
                 frames: str = "keysteps", keystep_request: bool = True, grounding: int = 2, grid: int = 10,
                 negatives: int = 1, image_format: str = "png", seed: int = 0) -> dict:
    """Write ``<out>/llava.json`` and the images; returns counts (samples by kind, images, episodes)."""
    import imageio.v3 as iio

    if frames not in FRAMES:
        raise ConfigError(f"frames={frames}: use one of {list(FRAMES)}")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image_format={image_format}: use one of {list(IMAGE_FORMATS)}")
    data_dir, out = Path(data_dir), Path(out)
    if not data_dir.is_dir():
        raise MissingInputError(f"DATA={data_dir}: no such dataset folder")
    files = index_files(data_dir, tasks)
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise MissingInputError(f"DATA={data_dir}: no task index files {missing or '(<Task>.h5)'}; "
                                f"is it a dataset written by `make data` or `make import-clevrskills`?")
    steps = OracleStepDataset(files, label_set=label_set, load_images=False)
    samples: list[dict] = []
    counts = {"code": 0, "grounding": 0, "images": 0, "episodes": len(steps.episodes)}
    handles: dict[str, object] = {}
    try:
        for ep in steps.episodes:
            if ep.file not in handles:
                handles[ep.file] = schema.open_index(ep.file)
            g = handles[ep.file]["episodes"][ep.name]
            names = list(g["objects/name"].asstr()[:])
            rng = np.random.default_rng([seed, ep.seed, zlib.crc32(ep.task.encode())])
            keep = range(ep.length) if frames == "all" else ep.key_t
            folder = out / "images" / ep.task
            folder.mkdir(parents=True, exist_ok=True)
            source = f"{ep.task}/{ep.name}"
            for t in keep:
                image = g["obs/base_rgb"][t]
                rel = f"images/{ep.task}/{ep.name}_t{t:04d}.{image_format}"
                iio.imwrite(out / rel, image)
                counts["images"] += 1
                memory = steps.memory(ep, t)
                key = is_key_step(ep.labels[t])
                if not key or not keystep_request or frames == "all":
                    samples.append({"id": f"{source}/t{t:04d}/code", "image": rel,
                                    "conversations": _turns(code_question(ep.prompt, memory), ep.labels[t]),
                                    "source": source, "object_conversation": False})
                    counts["code"] += 1
                if key and keystep_request:
                    samples.append({"id": f"{source}/t{t:04d}/keystep", "image": rel,
                                    "conversations": _turns(code_question(ep.prompt, memory, True), ep.labels[t]),
                                    "source": source, "object_conversation": False})
                    counts["code"] += 1
                if grounding > 0:
                    qa = vqa_samples(names, g["obs/bboxes"][t], image.shape[1], rng, n=grid, negatives=negatives)
                    for j, i in enumerate(rng.permutation(len(qa))[:grounding] if qa else []):
                        q, a = qa[i]
                        samples.append({"id": f"{source}/t{t:04d}/grounding{j}", "image": rel,
                                        "conversations": _turns(grounding_question(q), a),
                                        "source": source, "object_conversation": True})
                        counts["grounding"] += 1
    finally:
        for f in handles.values():
            f.close()
    schema.atomic_write_text(out / "llava.json", json.dumps(samples, indent=1))
    counts["samples"] = len(samples)
    return counts
