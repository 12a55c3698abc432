"""VQA samples for the code-generating VLM (paper 4.2), built from the HDF5 labels.

Two kinds of samples, each an image (the base camera) with a question and an answer:

* **code** at step t: question = task prompt + memory block M_t (the key-step lines before t)
  [+ the key-step request], answer = the step's code label (key-step line, or its ``# ``-commented
  form on later steps of the call). With the key-step request (VLM+Oracle mode) the sample is
  taken at a key-step frame and the answer is that key-step line.
* **bbox** (grounding): "Where is the <object>?" -> "(x, y)", "Is there a <object> at (x, y)?" ->
  yes/no on a coarse grid (``datamodules.grounding``).

The question text is laid out as ``Task: ...\\nMemory:\\n...\\n<image>[\\n<request>]``: everything
before the image token depends only on the task and the memory, so the planner can reuse its
KV cache between control steps (``policies.vlm_planner``). The prompt around the question is
``PromptFormat.template``.

Optional, not in the paper (``missed_keystep_fraction``, default 0): extra code samples at
intermediate frames whose memory lacks the running call's key-step, answered with that key-step.
At inference a key-step that greedy decoding missed at its exact frame otherwise leaves the
planner in states it never saw in training (the image shows call j running, the memory ends at
call j-1), and a small model then repeats the commented old line for the rest of the episode.

Optional, not in the paper (``keystep_request_repeat``, default 1): each key-step sample asked
with the key-step request appears that many times. Requests are always answered with a key-step
line, so this adds weight to the lines that carry the plan's arguments (a Push's direction is
written once per episode, in its first line) without teaching the unrequested mode to emit
key-steps eagerly.

Optional, not in the paper (``first_keystep_repeat``, default 1): the request sample of an
episode's first key-step appears that many times (at least ``keystep_request_repeat``). That line
copies the task prompt's arguments (objects, direction), and the tiny cpu model got it wrong on
training episodes (PlaceNextTo 6 and Push 9 of 30, measured) while writing the later lines right.

Optional, not in the paper (``unfinished_request_fraction``, default 0): extra key-step-request
samples at intermediate frames of a running call, at least ``unfinished_margin`` steps before its
end, answered with the commented running line (``# `` + line: "that call is not finished yet").
Otherwise requests are only ever asked at key-step frames, so the VLM learns that a request always
advances the plan. At inference VLM+DP asks with the request when the DP's line ends
(``policies.vlm_dp``); a DP that stopped short (a ``move3d`` ended 8 steps in, the object still
far from its target) then got the next line, and the episode failed with the oracle's plan
written line for line (measured, README). With these samples the VLM can answer from the image
that the call is unfinished, and the DP gets its line again, as DP+Oracle's tracker re-issues it.

Frames are subsampled: every key-step frame, plus a seeded ``intermediate_fraction`` of the other
frames, which carry the importance weight 1 / intermediate_fraction in the loss, so that the
model still learns the true share of key-step frames (about 1 in 8) and does not emit key-steps
too eagerly at inference. Episodes are split into train and validation by seed (the last episodes of each task).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from configs.errors import ConfigError

from . import schema
from .dataset import OracleStepDataset
from .grounding import vqa_samples
from .labels import is_key_step, uncomment

KEYSTEP_REQUEST = "Please give a keystep reply"
IMAGE = "<image>"
CODE, BBOX = 0, 1  # sample kinds
KINDS = ("code", "bbox")


# ---------------------------------------------------------------------------- prompt text
def memory_block(memory: list[str]) -> str:
    return "Memory:\n" + ("\n".join(memory) if memory else "None") + "\n"


def code_question(task_prompt: str, memory: list[str], keystep_request: bool = False,
                  image_token: str = IMAGE) -> str:
    """Question of a code-generation sample (the image token sits after task and memory)."""
    q = f"Task: {task_prompt}\n{memory_block(memory)}{image_token}"
    return q + f"\n{KEYSTEP_REQUEST}" if keystep_request else q


def grounding_question(question: str, image_token: str = IMAGE) -> str:
    return f"{question}\n{image_token}"


@dataclass(frozen=True)
class PromptFormat:
    """The prompt around a question; the answer follows it directly, then the EOS token.

    ``template`` must hold ``{question}``. The default is the LLaVA-1.5 conversation layout
    with a newline before the answer (so no answer starts with a space token).
    """

    template: str = "USER: {question}\nASSISTANT:\n"

    def prompt(self, question: str) -> str:
        return self.template.format(question=question)

    def split_at_image(self, prompt: str, image_token: str = IMAGE) -> tuple[str, str]:
        """(prefix, rest): the text before the image token, and the rest from the image token on."""
        i = prompt.index(image_token)
        return prompt[:i], prompt[i:]


# ---------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class Item:
    kind: int          # CODE or BBOX
    episode: int       # index into the step dataset's episodes
    t: int
    request: bool = False  # code: asked with the key-step request
    qa: int = -1           # bbox: which of the frame's grounding questions
    weight: float = 1.0    # loss weight: 1 / intermediate_fraction on subsampled frames
    missed: bool = False   # code: the memory lacks the running call's key-step (see missed_keystep_fraction)
    unfinished: bool = False  # code: request at a frame of a running call, answered "# <line>" (see
                              # unfinished_request_fraction)


def split_episodes(files, val_fraction: float) -> tuple[set, set]:
    """(train, val) sets of (task, seed): per task the last ``round(val_fraction * n)`` seeds
    (at least one when val_fraction > 0 and the task has two or more episodes) are held out."""
    train, val = set(), set()
    for path in files:
        with schema.open_index(path) as f:
            task = str(f.attrs["task"])
            seeds = sorted(int(n[5:]) for n in f["episodes"])
        n_val = int(round(val_fraction * len(seeds)))
        if val_fraction > 0 and len(seeds) >= 2:
            n_val = min(max(n_val, 1), len(seeds) - 1)
        cut = len(seeds) - n_val
        train |= {(task, s) for s in seeds[:cut]}
        val |= {(task, s) for s in seeds[cut:]}
    return train, val


class VQADataset(Dataset):
    """Mixed code / bbox VQA samples over the episodes of ``files`` accepted by ``select``.

    A sample is a dict::

        image     (H, W, 3) uint8   base camera at step t
        question  str               without the prompt template (see ``PromptFormat``)
        answer    str
        kind      int               CODE or BBOX
        request   bool              code sample asked with the key-step request
        key_step  bool              code sample whose answer is a key-step line
        weight    float             loss weight (importance weight of subsampled frames)
        task, episode, t
    """

    def __init__(self, files, select=None, code_fraction: float = 0.5, intermediate_fraction: float = 0.5,
                 keystep_request: bool = True, grid: int = 10, negatives: int = 1, seed: int = 0,
                 label_set: str = "oracle", max_items: int = 0, missed_keystep_fraction: float = 0.0,
                 keystep_request_repeat: int = 1, unfinished_request_fraction: float = 0.0,
                 unfinished_margin: int = 4, first_keystep_repeat: int = 1):
        if not 0 < code_fraction <= 1:
            raise ConfigError(f"code_fraction must be in (0, 1], got {code_fraction}")
        if keystep_request_repeat < 1 or first_keystep_repeat < 1:
            raise ConfigError(f"keystep_request_repeat and first_keystep_repeat must be >= 1, got "
                              f"{keystep_request_repeat} and {first_keystep_repeat}")
        if not 0 <= unfinished_request_fraction <= 1 or unfinished_margin < 0:
            raise ConfigError(f"unfinished_request_fraction must be in [0, 1] (got {unfinished_request_fraction}) "
                              f"and unfinished_margin >= 0 (got {unfinished_margin})")
        self.steps = OracleStepDataset(files, label_set=label_set, select=select, load_images=False)
        self.grid, self.negatives = int(grid), int(negatives)
        self.seed = int(seed)
        self._pid, self._files, self._groups = None, {}, {}
        code, frames = [], []
        first = max(keystep_request_repeat, first_keystep_repeat)  # request copies of an episode's first key-step
        for e, ep in enumerate(self.steps.episodes):
            rng = np.random.default_rng([self.seed, ep.seed, zlib.crc32(ep.task.encode())])
            keep = [t for t in range(ep.length)
                    if is_key_step(ep.labels[t]) or rng.random() < intermediate_fraction]
            frames += [(e, t) for t in keep]
            w = 1.0 / intermediate_fraction if intermediate_fraction > 0 else 1.0
            code += [Item(CODE, e, t, weight=1.0 if is_key_step(ep.labels[t]) else w) for t in keep]
            if keystep_request:
                code += [Item(CODE, e, t, request=True) for i, t in enumerate(ep.key_t)
                         for _ in range(first if i == 0 else keystep_request_repeat)]
            if missed_keystep_fraction > 0:
                code += [Item(CODE, e, t, missed=True) for t in keep
                         if not is_key_step(ep.labels[t]) and rng.random() < missed_keystep_fraction]
            if keystep_request and unfinished_request_fraction > 0:
                code += [Item(CODE, e, t, request=True, unfinished=True) for t in range(ep.length)
                         if self.unfinished_frame(ep, t, unfinished_margin)
                         and rng.random() < unfinished_request_fraction]
        n_bbox = int(round(len(code) * (1 - code_fraction) / code_fraction)) if frames else 0
        rng = np.random.default_rng([self.seed, 1])
        picks = rng.integers(len(frames), size=n_bbox) if n_bbox else []
        # qa: a random number; the question is the frame's (qa mod number of questions)-th
        bbox = [Item(BBOX, *frames[i], qa=int(rng.integers(2**31))) for i in picks]
        self.items = code + bbox
        if max_items and len(self.items) > max_items:  # keep the mix: subsample evenly
            idx = np.random.default_rng([self.seed, 2]).permutation(len(self.items))[:max_items]
            self.items = [self.items[i] for i in sorted(idx)]

    @staticmethod
    def unfinished_frame(ep, t: int, margin: int) -> bool:
        """Step ``t`` runs a call (its label is commented, a key-step came before it) that goes on
        for more than ``margin`` further steps: its image shows that call unfinished."""
        return (not is_key_step(ep.labels[t]) and bool(ep.key_t) and ep.key_t[0] < t
                and OracleStepDataset.line_end(ep, t) - t > margin)

    def __len__(self) -> int:
        return len(self.items)

    def kinds(self) -> np.ndarray:
        return np.array([it.kind for it in self.items])

    def _group(self, e: int):
        if self._pid != os.getpid():  # never share HDF5 handles with a forked/spawned worker
            self._pid, self._files, self._groups = os.getpid(), {}, {}
        if e not in self._groups:
            ep = self.steps.episodes[e]
            if ep.file not in self._files:
                self._files[ep.file] = schema.open_index(ep.file)
            self._groups[e] = self._files[ep.file]["episodes"][ep.name]
        return self._groups[e]

    def __getitem__(self, index: int) -> dict:
        it = self.items[index]
        ep = self.steps.episodes[it.episode]
        g = self._group(it.episode)
        image = g["obs/base_rgb"][it.t]
        out = {"image": image, "kind": it.kind, "request": it.request, "weight": it.weight, "task": ep.task,
               "episode": ep.name, "t": it.t}
        if it.kind == CODE:
            out["question"], out["answer"] = self._code_qa(it)
            out["key_step"] = is_key_step(out["answer"])
        else:
            names = list(g["objects/name"].asstr()[:])
            rng = np.random.default_rng([self.seed, it.episode, it.t, it.qa])
            qa = vqa_samples(names, g["obs/bboxes"][it.t], image.shape[1], rng, n=self.grid,
                             negatives=self.negatives)
            if qa:
                q, a = qa[it.qa % len(qa)]
                out.update(question=grounding_question(q), answer=a, key_step=False)
            else:  # no object visible in this frame (imported data): the frame's code sample instead
                out["question"], out["answer"] = self._code_qa(Item(CODE, it.episode, it.t))
                out.update(kind=CODE, key_step=is_key_step(out["answer"]))
        return out

    def _code_qa(self, it: Item) -> tuple[str, str]:
        ep = self.steps.episodes[it.episode]
        label, memory = ep.labels[it.t], self.steps.memory(ep, it.t)
        if it.missed:  # the running call's key-step never made it into the memory: emit it now
            memory, label = memory[:-1], memory[-1]
        answer = uncomment(label) if it.request and not it.unfinished else label
        return code_question(ep.prompt, memory, it.request), answer

    def corpus(self) -> list[str]:
        """Every distinct question and answer text (for tokenizer training; reads bbox labels)."""
        texts = set()
        for i in range(len(self)):
            it = self.items[i]
            if it.kind == CODE:
                q, a = self._code_qa(it)
                texts.update((q, a, uncomment(a)))
            else:
                s = self[i]
                texts.update((s["question"], s["answer"]))
        return sorted(texts)


# ---------------------------------------------------------------------------- batches
class VQACollator:
    """Tokenises samples into a training batch; loss only on the answer tokens.

    Returns ``input_ids, attention_mask, labels`` (B, L) long (labels -100 on the prompt,
    image and padding tokens), ``pixel_values`` (B, 3, S, S) float, ``kind``, ``request``,
    ``key_step``, ``weight`` (B,), and ``answer_start`` (B,) the index of the first answer token.
    """

    def __init__(self, processor, fmt: PromptFormat | None = None, max_length: int = 1024):
        self.processor = processor
        self.tok = processor.tokenizer
        self.fmt = fmt or PromptFormat()
        self.max_length = max_length
        if self.tok.eos_token_id is None or self.tok.pad_token_id is None:
            raise ValueError("the tokenizer needs eos and pad tokens")

    def prompt_inputs(self, question: str, image: np.ndarray) -> tuple[list[int], torch.Tensor]:
        """Token ids of the full prompt (BOS, image tokens expanded) and its (3, S, S) pixels."""
        text = self.fmt.prompt(question.replace(IMAGE, self.processor.image_token))
        enc = self.processor(text=text, images=image, add_special_tokens=False, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        if self.tok.bos_token_id is not None:
            ids = [self.tok.bos_token_id] + ids
        return ids, enc["pixel_values"][0]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]

    def __call__(self, samples: list[dict]) -> dict:
        rows, pixels, starts = [], [], []
        for s in samples:
            prompt, pix = self.prompt_inputs(s["question"], s["image"])
            answer = self.answer_ids(s["answer"])
            ids = (prompt + answer)[: self.max_length]
            if len(prompt) >= len(ids):
                raise ConfigError(f"prompt of {len(prompt)} tokens leaves no room for the answer "
                                 f"(max_length {self.max_length})")
            rows.append(ids)
            starts.append(len(prompt))
            pixels.append(pix)
        L = max(len(r) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, L), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, (r, s0) in enumerate(zip(rows, starts)):
            input_ids[i, : len(r)] = torch.tensor(r)
            labels[i, s0: len(r)] = torch.tensor(r[s0:])
            mask[i, : len(r)] = 1
        return {
            "input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.stack(pixels),
            "kind": torch.tensor([s["kind"] for s in samples]),
            "request": torch.tensor([bool(s["request"]) for s in samples]),
            "key_step": torch.tensor([bool(s["key_step"]) for s in samples]),
            "answer_start": torch.tensor(starts),
            "weight": torch.tensor([float(s.get("weight", 1.0)) for s in samples]),
        }


# ---------------------------------------------------------------------------- datamodule
class VQADataModule(L.LightningDataModule):
    """Train/val VQA loaders over task index files (validation: held-out episodes).

    ``data_cfg`` keys: val_fraction, code_fraction, intermediate_fraction, val_intermediate_fraction,
    keystep_request, missed_keystep_fraction, grid, negatives, batch_size, num_workers, seed,
    val_max_items. Validation never holds the missed-key-step samples. The processor (tokenizer)
    can be set later (``set_processor``), e.g. after training a tokenizer on ``train_set.corpus()``.
    """

    def __init__(self, data_cfg, files, processor=None, fmt: PromptFormat | None = None, max_length: int = 1024):
        super().__init__()
        self.cfg = data_cfg
        self.fmt, self.max_length = fmt, max_length
        self.collate = None
        if processor is not None:
            self.set_processor(processor)
        self.files = [Path(f) for f in files]
        train, val = split_episodes(self.files, float(data_cfg.val_fraction))
        kw = dict(code_fraction=float(data_cfg.code_fraction),
                  intermediate_fraction=float(data_cfg.intermediate_fraction),
                  keystep_request=bool(data_cfg.keystep_request), grid=int(data_cfg.grid),
                  missed_keystep_fraction=float(data_cfg.missed_keystep_fraction),
                  keystep_request_repeat=int(data_cfg.get("keystep_request_repeat", 1)),
                  unfinished_request_fraction=float(data_cfg.get("unfinished_request_fraction", 0.0)),
                  unfinished_margin=int(data_cfg.get("unfinished_margin", 4)),
                  first_keystep_repeat=int(data_cfg.get("first_keystep_repeat", 1)),
                  negatives=int(data_cfg.negatives), seed=int(data_cfg.seed))
        self.train_set = VQADataset(self.files, select=lambda task, seed: (task, seed) in train, **kw)
        kw.update(intermediate_fraction=float(data_cfg.val_intermediate_fraction), missed_keystep_fraction=0.0,
                  keystep_request_repeat=1, unfinished_request_fraction=0.0, first_keystep_repeat=1)
        self.val_set = VQADataset(self.files, select=lambda task, seed: (task, seed) in val,
                                  max_items=int(data_cfg.val_max_items), **kw) if val else None
        if len(self.train_set) == 0:
            raise ConfigError(f"no training samples in {[str(f) for f in self.files]}")

    def set_processor(self, processor) -> None:
        self.collate = VQACollator(processor, self.fmt, self.max_length)

    def _loader(self, ds, shuffle: bool) -> DataLoader:
        workers = int(self.cfg.num_workers)
        return DataLoader(ds, batch_size=int(self.cfg.batch_size), shuffle=shuffle, num_workers=workers,
                          collate_fn=self.collate, persistent_workers=workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False) if self.val_set is not None else []
