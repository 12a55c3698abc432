"""The code VLM at inference time (paper 4.2, "Efficient Inference"): a planner with a memory.

::

    planner = VLMPlanner.from_pretrained("outputs/vlm/cpu/export")   # or a run folder / .ckpt
    planner.reset("Place the red cube on top of the blue cylinder.")
    step = planner.step(image)          # (H, W, 3) uint8 base camera -> PlanStep (VLM + DP mode)
    step = planner.next_key_step(image) # key-step request (VLM + Oracle mode)
    planner.memory, planner.cache_info  # key-step lines so far; ExtractMemoryInfo for the DP
    steps = VLMPlanner.plan_many(planners, images, requests)  # B planners (forks), one batch

Memory rule (the one ``datamodules.labels.memories`` used to build the training prompts): a
generated line is appended when it is a key-step, i.e. not commented out, and only then; equal
consecutive key-steps are appended again, as in the oracle traces.

Decoding is greedy and bounded by ``max_new_tokens``. Early stopping: in ``step`` mode, once the
first ``early_stop_k`` generated characters equal those of ``"# " + memory[-1]`` (the commented
last key-step), decoding stops and that commented line is returned. Prefix KV caching: the prompt
is ``template(Task + Memory + <image> [+ request])``; the part before the image depends only on the
task and the memory (this layout, image after the memory, is what the VLM is trained on; LLaVA's
own puts the image first), so its KV cache is computed once per memory state and reused at every
control step; only the image tokens and the few tokens after them are computed per step.

Fast queries (``fast=True``, the default; ``fast=False`` is the reference decoding, one
``transformers`` forward per token, kept for comparison). The greedy tokens are the same (the
tests compare them token for token; logits agree to float rounding), computed with fewer passes:

* **Verification of the expected continuation** (as speculative decoding verifies a draft): the
  tokens of ``"# " + memory[-1]`` up to the early-stopping point are appended to the image
  prefill, so one forward pass gives the greedy choice at each of their positions. Tokens are
  accepted while the greedy choice equals the draft; at the first difference the rest is dropped
  and decoding goes on token by token, with drafts looked up in the prompt (the n-gram that
  ends the line so far, found in the task and memory: lines copy object names and earlier calls).
* **Incremental prefix**: when the memory grows, only the tokens after the longest common
  token prefix of the old and new prompt prefix are run.
* **Vision reuse**: an image equal to the last one reuses its vision features.
* **Lean forward**: the forward passes of ``policies.vlm_runtime`` (the model's own weights
  without the library's per-call overhead; the library's model for other architectures),
  with the processor's pixel normalisation as a lookup table and the prompt tokens cached.
* **Batches**: ``plan_many`` runs the queries of B planners (``fork()``: one model, B episodes)
  as one batch, left-padded, each row with its own memory, prefix and draft.

Object-constrained decoding (``constrain_objects``, not in the paper): when the caller gives the
scene's object names, the string argument of ``get_actor('...')`` may only spell one of them,
and one line may not name the same object twice (no skill takes an object twice);
at each token the best-scoring token that keeps the line consistent with that rule is taken
(greedy decoding otherwise untouched). The skill API can only resolve objects of the scene, so
this restricts decoding to lines the API accepts, as grammar-constrained decoding does. Why: the
paper's pretrained Phi-3 copies the names of the prompt reliably; the tiny random-init cpu-preset
model often mixes a colour of one object with the shape of another (measured in the README).
The same flag constrains ``pose_dict['...']`` reads (any ``pose_dict[`` but the assignment target
that starts a line) to keys that a ``pose_dict[...] =`` line of the memory has stored: a read of
any other key fails at run time ("pose_dict has no key"). Measured on Swap (README, "Reproducing
the paper"): 17 of 64 VLM+Oracle episodes ended so, the key spelling one object's colour with
another's shape.

Context limit (not in the paper, which does not say what happens when the memory outgrows the
model): :meth:`VLMPlanner.check_context` raises :class:`~policies.base.PolicyFailure`
``"context full"`` when the next query's prompt and ``max_new_tokens`` would not fit the text
model's ``max_position_embeddings`` (1024 for the cpu preset, 4096 for Phi-3-mini-4k). The
policies call it before every query, so an episode whose planner keeps appending key-steps ends as
a recorded failure instead of running on positions the model never saw in training (its
training samples are cut at ``max_length``, also 1024): measured, README "Batched evaluation".

Malformed lines (unparseable, a function outside the skill API, an object not in ``objects``
when the caller gave the scene's objects) come back with ``PlanStep.error`` set; nothing is ever
executed here.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from configs.errors import MissingInputError
from datamodules.labels import (POSE_DICT_ASSIGNMENT, POSE_DICT_READ, commented, extract_memory_info, is_key_step,
                               uncomment)
from datamodules.vqa import PromptFormat, code_question


@dataclass
class PlanStep:
    line: str            # the generated code line (key-step, or '# '-commented non-key-step)
    key_step: bool       # not commented out
    new_key_step: bool   # a key-step that was appended to memory at this call
    error: str | None    # None if the line parses as skill-API code; else why
    tokens: int          # new tokens decoded for this call
    early_stopped: bool
    forwards: int = 0    # decoder forward passes this call took (prefix updates excluded)


@dataclass
class PlannerStats:
    calls: int = 0
    tokens: int = 0           # tokens decoded (generated), over all calls
    prefill_tokens: int = 0   # prompt tokens run through the model (prefix cache hits excluded)
    early_stops: int = 0
    errors: int = 0
    forwards: int = 0         # decoder forward passes (a batched pass counts once per row)
    drafted: int = 0          # draft tokens verified (fast queries)
    accepted: int = 0         # ... of which the greedy choice accepted
    vision_reuses: int = 0    # images equal to the last one: vision features reused
    per_call: list = field(default_factory=list)


class _Line:
    """Greedy decoding of one line, one token at a time: early stopping, EOS, ``max_new_tokens``
    (the same rule for the reference and the fast queries, see the module docstring)."""

    def __init__(self, planner: "VLMPlanner", request: bool, stop_target: str | None):
        self.planner, self.request, self.stop_target = planner, request, stop_target
        self.ids: list[int] = []
        self.early = self.finished = False
        k = planner.early_stop_k
        self.k = min(k, len(stop_target)) if stop_target and k > 0 else 0
        self.checking = self.k > 0
        self.forwards = 0

    def feed(self, token: int) -> bool:
        """Take the next greedy token; False when the line is complete."""
        tok = self.planner.tok
        self.ids.append(token)
        if token == tok.eos_token_id:
            self.finished = True
            return False
        if self.checking:
            text = tok.decode(self.ids, skip_special_tokens=True)
            if len(text) >= self.k:
                if text[: self.k] == self.stop_target[: self.k]:
                    self.early = True
                    return False
                self.checking = False
            elif not self.stop_target.startswith(text):
                self.checking = False
        return len(self.ids) < self.planner.max_new_tokens

    def draft(self) -> list[int]:
        """The expected continuation's tokens: ``stop_target`` up to the early-stopping point (all
        of it and EOS without early stopping); none without a target."""
        if not self.stop_target:
            return []
        ids = self.planner._encode(self.stop_target)
        if self.k <= 0:
            return ids + [self.planner.tok.eos_token_id]
        tok = self.planner.tok
        for n in range(1, len(ids) + 1):
            if len(tok.decode(ids[:n], skip_special_tokens=True)) >= self.k:
                return ids[:n]
        return ids

    def finish(self) -> PlanStep:
        """The PlanStep; the memory and the statistics are updated."""
        p = self.planner
        ids = self.ids
        line = self.stop_target if self.early else p.tok.decode(ids, skip_special_tokens=True).strip()
        error = p.check(line)
        if error is None and not self.early and not self.finished:
            error = f"no end of line within max_new_tokens={p.max_new_tokens}"
        key = is_key_step(line)
        if key:
            p.memory.append(line)
        s = p.stats
        s.calls += 1
        s.tokens += len(ids)
        s.early_stops += self.early
        s.errors += error is not None
        s.forwards += self.forwards
        s.per_call.append(len(ids))
        return PlanStep(line=line, key_step=key, new_key_step=key, error=error, tokens=len(ids),
                        early_stopped=self.early, forwards=self.forwards)


class VLMPlanner:
    """Greedy code generation with a key-step memory (see the module docstring).

    ``model``: ``LlavaForConditionalGeneration``; ``processor``: its ``LlavaProcessor``.
    ``constrain_objects``: object-constrained decoding when ``reset`` is given the scene's objects.
    ``fast``: the fast queries (default); False: the reference decoding (``use_prefix_cache``
    applies to it only). ``lean``: the lean forward passes where the architecture allows.
    ``lookup_drafts``: after a divergence, draft tokens looked up in the prompt (fast queries).
    """

    def __init__(self, model, processor, prompt_template: str = PromptFormat.template, early_stop_k: int = 6,
                 max_new_tokens: int = 96, use_prefix_cache: bool = True, device: str = "cpu",
                 constrain_objects: bool = True, fast: bool = True, lean: bool = True, lookup_drafts: bool = True):
        self.model = model.to(device).eval()
        self.processor = processor
        self.tok = processor.tokenizer
        self.fmt = PromptFormat(prompt_template)
        self.early_stop_k = int(early_stop_k)
        self.max_new_tokens = int(max_new_tokens)
        self.use_prefix_cache = bool(use_prefix_cache)
        self.constrain_objects = bool(constrain_objects)
        self._key_step_only = False  # set by next_key_step(require_key_step=True) for its query
        self.fast = bool(fast)
        self.lookup_drafts = bool(lookup_drafts)
        self.device = torch.device(device)
        self._pixel_dtype = next(model.model.vision_tower.parameters()).dtype
        self._parser = None
        # shared by forks (one model, many episodes): runtime, token and check caches
        from .vlm_runtime import make_runtime

        self.runtime = make_runtime(self.model, lean=lean)
        self._shared = {"encode": {}, "rest": {}, "checks": {}, "pixel_table": {}}
        self.task_prompt = ""
        self.objects: list[str] | None = None
        self.memory: list[str] = []
        self._stored_keys: tuple[list[str] | None, int, set[str]] = (None, 0, set())  # stored_keys()' cache
        self.stats = PlannerStats()
        self.reset("")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path, device: str = "cpu", **overrides) -> "VLMPlanner":
        """From an exported VLM folder (``<out>/export``), a training run folder, or a VLM
        ``.ckpt``. ``overrides``: constructor arguments (early_stop_k, max_new_tokens, ...)."""
        path = Path(path)
        if path.is_dir() and not (path / "vlm.json").exists() and (path / "export" / "vlm.json").exists():
            path = path / "export"
        if path.is_file() and path.suffix == ".ckpt":
            from lightning_modules.vlm.module import VLMModule

            return cls.from_module(VLMModule.from_checkpoint(path), device=device, **overrides)
        if not path.exists():
            raise MissingInputError(f"no VLM at {path}: give an exported folder (<out>/export of "
                                    f"`make train-vlm`), a run folder or a .ckpt file")
        from lightning_modules.vlm.model import load_vlm

        model, processor, meta = load_vlm(path, device=device)
        kwargs = {k: meta[k] for k in ("prompt_template", "early_stop_k", "max_new_tokens", "constrain_objects")
                  if k in meta}
        kwargs.update(overrides)
        return cls(model, processor, device=device, **kwargs)

    @classmethod
    def from_module(cls, module, device: str = "cpu", **overrides) -> "VLMPlanner":
        """From a trained ``VLMModule`` in memory (LoRA merged into a copy)."""
        from lightning_modules.vlm.model import plain_model

        hp = module.hparams
        kwargs = {"prompt_template": hp.prompt_template, **{k: hp.inference_cfg[k] for k in
                                                            ("early_stop_k", "max_new_tokens", "constrain_objects")
                                                            if k in hp.inference_cfg}}
        kwargs.update(overrides)
        return cls(plain_model(module.model), module.processor, device=device, **kwargs)

    def fork(self) -> "VLMPlanner":
        """A planner for another episode on the same model (shared weights, runtime and caches;
        its own memory, prefix cache and statistics), e.g. one per environment of a batch."""
        import copy

        other = copy.copy(self)
        other.reset("")
        other.stats = PlannerStats()
        return other

    # ------------------------------------------------------------------ episode state
    def reset(self, task_prompt: str, objects: list[str] | None = None) -> None:
        """Start an episode: empty memory. ``objects``: the scene's object names, if known, to
        flag ``get_actor`` calls of other objects (and, with ``constrain_objects``, to decode
        only those names)."""
        self.task_prompt = str(task_prompt)
        self.objects = list(objects) if objects is not None else None
        self.memory = []
        self._prefix_ids, self._cache = None, None  # reference decoding: transformers' cache
        self._kv_ids, self._kv = None, None  # fast queries: the prefix's KVBatch of one row, and its ids
        self._last_image, self._last_features = None, None

    @property
    def cache_info(self) -> str:
        return extract_memory_info(self.memory)

    def step(self, image: np.ndarray) -> PlanStep:
        """VLM + DP mode: the code line for this control step; updates the memory."""
        if self.fast:
            return self.plan_many([self], [image], [False])[0]
        return self._plan(image, request=False, stop_target=self._stop_target(False))

    def next_key_step(self, image: np.ndarray, require_key_step: bool = False) -> PlanStep:
        """VLM + Oracle mode: ask with the key-step request for the next key-step line.
        ``require_key_step``: the line may not be commented out (its first token is the best one
        that does not start a comment): for callers that know the running line has ended (an
        oracle skill terminated), where the answer "# <running line>" (not finished, which a VLM
        trained with ``unfinished_request_fraction`` may give) cannot be acted on."""
        self._key_step_only = bool(require_key_step)
        try:
            if self.fast:
                return self.plan_many([self], [image], [True])[0]
            return self._plan(image, request=True, stop_target=None)
        finally:
            self._key_step_only = False

    @property
    def max_positions(self) -> int | None:
        """The text model's ``max_position_embeddings`` (None: no limit known)."""
        cfg = getattr(self.model.config, "text_config", self.model.config)
        n = getattr(cfg, "max_position_embeddings", None)
        return int(n) if n else None

    def prompt_tokens(self, image: np.ndarray, request: bool = False) -> int:
        """Tokens of the next query's prompt: task, memory, the expanded image, the answer prefix."""
        prefix, rest = self._prompt_parts(request)
        return len(self._prefix_token_ids(prefix)) + len(self._rest_ids(rest, np.asarray(image)))

    def check_context(self, image: np.ndarray, request: bool = False) -> None:
        """Raise :class:`~policies.base.PolicyFailure` ``"context full"`` when the next query
        (prompt + ``max_new_tokens``) would not fit the model's positions (module docstring)."""
        limit = self.max_positions
        if limit is None:
            return
        n = self.prompt_tokens(image, request)
        if n + self.max_new_tokens > limit:
            from .base import PolicyFailure

            raise PolicyFailure("context full", f"the prompt has {n} tokens ({len(self.memory)} memory lines); "
                                f"with up to {self.max_new_tokens} new tokens it exceeds the VLM's {limit} positions")

    def _stop_target(self, request: bool) -> str | None:
        return commented(self.memory[-1]) if self.memory and not request else None

    # ------------------------------------------------------------------ reference decoding
    def _plan(self, image: np.ndarray, request: bool, stop_target: str | None) -> PlanStep:
        line = _Line(self, request, stop_target)
        for token in self._token_stream(image, request):
            line.forwards += 1
            if not line.feed(token):
                break
        return line.finish()

    def _prompt_parts(self, request: bool) -> tuple[str, str]:
        question = code_question(self.task_prompt, self.memory, request, image_token=self.processor.image_token)
        return self.fmt.split_at_image(self.fmt.prompt(question), self.processor.image_token)

    def _prefix_token_ids(self, prefix: str) -> list[int]:
        ids = self._encode(prefix) if self.fast else self.tok(prefix, add_special_tokens=False)["input_ids"]
        return [self.tok.bos_token_id] + ids if self.tok.bos_token_id is not None else list(ids)

    @torch.no_grad()
    def _token_stream(self, image: np.ndarray, request: bool) -> Iterator[int]:
        """Greedy tokens, one ``transformers`` forward pass each, computed lazily (stop consuming
        to stop): the reference decoding."""
        prefix, rest = self._prompt_parts(request)
        prefix_ids = self._prefix_token_ids(prefix)
        enc = self.processor(text=rest, images=np.asarray(image), add_special_tokens=False, return_tensors="pt")
        rest_ids = enc["input_ids"].to(self.device)
        pixels = enc["pixel_values"].to(self.device, self._pixel_dtype)
        if self.use_prefix_cache:
            if self._prefix_ids != prefix_ids or self._cache is None:
                out = self.model(input_ids=torch.tensor([prefix_ids], device=self.device), use_cache=True)
                self._cache, self._prefix_ids = out.past_key_values, prefix_ids
                self.stats.prefill_tokens += len(prefix_ids)
            else:  # drop what the last call appended after the prefix (crop takes minus that count)
                extra = self._cache.get_seq_length() - len(prefix_ids)
                if extra > 0:
                    self._cache.crop(-extra)
            cache = self._cache
            out = self.model(input_ids=rest_ids, pixel_values=pixels, past_key_values=cache, use_cache=True)
            self.stats.prefill_tokens += rest_ids.shape[1]
        else:
            input_ids = torch.cat([torch.tensor([prefix_ids], device=self.device), rest_ids], dim=1)
            out = self.model(input_ids=input_ids, pixel_values=pixels, use_cache=True)
            cache = out.past_key_values
            self.stats.prefill_tokens += input_ids.shape[1]
        generated: list[int] = []
        while True:
            token = self._choose(out.logits[0, -1], generated)
            generated.append(token)
            yield token
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=cache,
                             use_cache=True)

    # ------------------------------------------------------------------ fast queries
    def _encode(self, text: str) -> list[int]:
        cache = self._shared["encode"]
        if text not in cache:
            if len(cache) > 4096:
                cache.clear()
            cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return cache[text]

    def _rest_ids(self, rest: str, image: np.ndarray) -> list[int]:
        """Token ids of the prompt from the image token on (image placeholders expanded)."""
        key = (rest, image.shape[:2])
        cache = self._shared["rest"]
        if key not in cache:
            enc = self.processor(text=rest, images=image, add_special_tokens=False, return_tensors="pt")
            cache[key] = enc["input_ids"][0].tolist()
        return cache[key]

    def _pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        """``(B, 3, S, S)``: the processor's pixel values (through its lookup table when exact)."""
        from .vlm_runtime import PixelTable

        shape = images[0].shape[:2]
        tables = self._shared["pixel_table"]
        if shape not in tables:
            tables[shape] = PixelTable.build(self.processor.image_processor, shape)
        table = tables[shape]
        if table is not None and all(im.shape[:2] == shape for im in images):
            pixels = torch.from_numpy(table(np.stack(images)))
        else:
            pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self._pixel_dtype)

    def _update_prefix(self, prefix_ids: list[int]) -> None:
        """The KV cache of ``prefix_ids``: kept, extended from the longest common prefix, or new."""
        from .vlm_runtime import KVBatch

        old = self._kv_ids if self._kv is not None else None
        if old == prefix_ids:
            return
        common = 0
        if old is None:
            self._kv = KVBatch.empty(self.runtime, self.device, capacity=len(prefix_ids) + 256)
        else:
            limit = min(len(old), len(prefix_ids))
            while common < limit and old[common] == prefix_ids[common]:
                common += 1
            common = min(common, len(prefix_ids) - 1)  # at least one token to run
            self._kv.crop(common)  # in place: the common part is kept, the rest overwritten
        new = prefix_ids[common:]
        ids = torch.tensor([new], device=self.device)
        self.runtime.forward(self._kv, self.runtime.embed(ids), torch.tensor([len(new)], device=self.device), keep=0)
        self._kv_ids = list(prefix_ids)
        self.stats.prefill_tokens += len(new)

    def _lookup(self, generated: list[int], n_max: int = 8) -> list[int]:
        """Prompt-lookup draft: the tokens that followed the last earlier occurrence of the n-gram
        (n = 3, then 2) that ends ``generated``, in the prompt prefix (task, memory) and the line."""
        context = self._kv_ids + generated
        for n in (3, 2):
            if len(generated) < n:
                continue
            tail = generated[-n:]
            for i in range(len(context) - n - 1, -1, -1):
                if context[i:i + n] == tail:
                    return context[i + n:i + n + n_max]
        return []

    @staticmethod
    @torch.no_grad()
    def plan_many(planners: list["VLMPlanner"], images: list[np.ndarray], requests: list[bool],
                  require_key_step: list[bool] | None = None) -> list[PlanStep]:
        """One query per planner (``request``: the key-step request of ``next_key_step``, else a
        ``step``), run as batches: one per request kind. ``planners`` share one model (``fork``);
        ``images``: ``(H, W, 3)`` uint8 each; ``require_key_step``: per row, as in
        ``next_key_step`` (requests only). Returns the PlanSteps in order; memories updated."""
        out: list[PlanStep | None] = [None] * len(planners)
        required = list(require_key_step) if require_key_step is not None else [False] * len(planners)
        try:
            for p, r, req in zip(planners, requests, required):
                if req:
                    p._key_step_only = bool(r)
            for kind in sorted(set(bool(r) for r in requests)):
                rows = [i for i, r in enumerate(requests) if bool(r) == kind]
                steps = VLMPlanner._plan_batch([planners[i] for i in rows], [np.asarray(images[i]) for i in rows],
                                               kind)
                for i, step in zip(rows, steps):
                    out[i] = step
        finally:
            for p, req in zip(planners, required):
                if req:
                    p._key_step_only = False
        return out

    @staticmethod
    def _plan_batch(planners: list["VLMPlanner"], images: list[np.ndarray], request: bool) -> list[PlanStep]:
        first = planners[0]
        rt = first.runtime
        B = len(planners)
        lines = [_Line(p, request, p._stop_target(request)) for p in planners]
        rest_text = None
        for p in planners:
            prefix, rest = p._prompt_parts(request)
            p._update_prefix(p._prefix_token_ids(prefix))
            rest_text = rest
        rest_ids = first._rest_ids(rest_text, images[0])
        # vision features, reused where the image is the last one
        feats: list[torch.Tensor | None] = []
        for p, im in zip(planners, images):
            same = p._last_image is not None and p._last_image.shape == im.shape and np.array_equal(p._last_image, im)
            feats.append(p._last_features if same else None)
            p.stats.vision_reuses += same
        todo = [i for i, f in enumerate(feats) if f is None]
        if todo:
            new = rt.image_features(first._pixels([images[i] for i in todo]))
            for j, i in enumerate(todo):
                feats[i] = new[j:j + 1]
                planners[i]._last_image, planners[i]._last_features = images[i].copy(), feats[i]
        # rows of similar prefix lengths go together (padding a batch to one very long prompt would
        # make every row pay for it); a row alone runs on its own prefix cache, in place
        order = sorted(range(B), key=lambda i: planners[i]._kv.size)
        groups, start = [], 0
        for end in range(1, B + 1):
            if end == B or planners[order[end]]._kv.size > 1.5 * planners[order[start]]._kv.size + 64:
                groups.append(order[start:end])
                start = end
        for group in groups:
            VLMPlanner._decode([planners[i] for i in group], [lines[i] for i in group], [feats[i] for i in group],
                               rest_ids)
        return [line.finish() for line in lines]

    @staticmethod
    def _decode(planners: list["VLMPlanner"], lines: list[_Line], feats: list[torch.Tensor], rest_ids: list[int]):
        """Greedy decoding of one batch: the image and what follows it, each row's draft, then the
        diverged rows token by token (with drafts looked up in the prompt)."""
        from .vlm_runtime import KVBatch

        first = planners[0]
        rt, device, tok = first.runtime, first.device, first.tok
        B = len(planners)
        drafts = [line.draft() for line in lines]
        width = max(len(d) for d in drafts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([rest_ids + d + [pad] * (width - len(d)) for d in drafts], device=device)
        embeds = rt.embed(ids)
        image_rows = ids[0] == rt.image_token_id
        embeds[:, image_rows] = torch.cat(feats).to(embeds.dtype)
        own = first._kv.size if B == 1 else None  # a row alone works in its prefix cache, cropped back after
        kv = first._kv if B == 1 else KVBatch.stack([p._kv for p in planners], extra=ids.shape[1] + 16)
        n_new = torch.tensor([len(rest_ids) + len(d) for d in drafts], device=device)
        logits = rt.forward(kv, embeds, n_new, keep=width + 1)
        for p, d in zip(planners, drafts):
            p.stats.prefill_tokens += len(rest_ids)
            p.stats.drafted += len(d)
        rows = list(range(B))  # batch row -> planner index
        pending: dict[int, int] = {}  # planner index -> the token to run next
        feeds = [(b, drafts[b], logits[b]) for b in range(B)]
        while True:
            best = logits.argmax(-1).tolist()  # (rows, positions): one device sync per forward
            for r, (b, draft, row_logits) in enumerate(feeds):
                line = lines[b]
                line.forwards += 1
                more = True
                for j in range(len(draft) + 1):
                    token = planners[b]._choose(row_logits[j], line.ids, best=best[r][j])
                    more = line.feed(token)
                    accepted = j < len(draft) and token == draft[j]
                    planners[b].stats.accepted += accepted
                    if not more or not accepted:
                        kv.reject(r, len(draft) - j - (1 if accepted else 0))
                        break
                if more:
                    pending[b] = token
            active = [b for b in rows if b in pending]
            if not active:
                break
            kv = kv.select([rows.index(b) for b in active])
            rows = active
            step_drafts = []
            for b in rows:
                p = planners[b]
                d = p._lookup(lines[b].ids) if p.lookup_drafts else []
                d = d[: max(0, p.max_new_tokens - len(lines[b].ids) - 1)]
                step_drafts.append(d)
                p.stats.drafted += len(d)
            width = max(len(d) for d in step_drafts)
            ids = torch.tensor([[pending[b]] + d + [pad] * (width - len(d)) for b, d in zip(rows, step_drafts)],
                               device=device)
            n_new = torch.tensor([1 + len(d) for d in step_drafts], device=device)
            logits = rt.forward(kv, rt.embed(ids), n_new, keep=width + 1)
            feeds = [(b, d, logits[r]) for r, (b, d) in enumerate(zip(rows, step_drafts))]
            pending.clear()
        if own is not None:
            first._kv.crop(own)

    _GET_ACTOR = re.compile(r"get_actor\(")
    _POSE_DICT = re.compile(r"pose_dict\[")

    def _choose(self, logits: torch.Tensor, generated: list[int], candidates: int = 256, best: int | None = None) -> int:
        """Greedy choice; with object-constrained decoding, the best token whose text keeps every
        ``get_actor('...`` argument a prefix of a scene object's name (or exactly one, closed),
        and every ``pose_dict['...`` read a prefix of a stored key (``_keys_ok``); with
        ``require_key_step`` (``next_key_step``), a first token that starts no comment.
        ``best``: ``logits.argmax()`` if already known (batched decoding reads them at once)."""
        token = int(logits.argmax()) if best is None else int(best)
        no_comment = self._key_step_only and not generated
        constrain = bool(self.constrain_objects and self.objects)
        if not (no_comment or constrain):
            return token

        def ok(t: int) -> bool:
            text = self.tok.decode(generated + [t], skip_special_tokens=True)
            if no_comment and (not text.strip() or text.lstrip().startswith("#")):
                return False
            return not constrain or (self._names_ok(text) and self._keys_ok(text))

        if ok(token):
            return token
        for t in logits.topk(min(candidates, logits.numel())).indices.tolist():
            if ok(t):
                return int(t)
        return token  # nothing fits: leave it to the checker to report

    @staticmethod
    def _string_args(pattern: re.Pattern, code: str) -> Iterator[tuple[int, str, bool]]:
        """For each match of ``pattern`` in ``code`` followed by a string literal:
        (match start, the literal's text so far, whether its closing quote is there)."""
        for match in pattern.finditer(code):
            rest = code[match.end():]
            if not rest or rest[0] not in "'\"":
                continue  # not a string literal (or not yet): unconstrained
            end = rest.find(rest[0], 1)
            yield match.start(), (rest[1:] if end < 0 else rest[1:end]), end >= 0

    def _names_ok(self, text: str) -> bool:
        """Every ``get_actor`` string literal in ``text`` (one line) names a scene object, each
        a different one (no skill takes the same object twice: ``place(a, a)`` is refused by the
        API), or is an unfinished prefix of such a name."""
        used: set[str] = set()
        for _, arg, closed in self._string_args(self._GET_ACTOR, text):
            free = [name for name in self.objects if name not in used]
            if not closed:
                if not any(name.startswith(arg) for name in free):
                    return False
            elif arg not in free:
                return False
            else:
                used.add(arg)
        return True

    def stored_keys(self) -> set[str]:
        """The ``pose_dict`` keys that the memory's assignment lines have stored. Cached while the
        memory is the same list at the same length (it only grows within an episode), so that
        constrained decoding reads it once per memory line, not once per candidate token."""
        memory, length, keys = self._stored_keys
        if memory is not self.memory or length != len(self.memory):
            keys = set()
            for line in self.memory:
                if POSE_DICT_ASSIGNMENT.match(line):
                    match = POSE_DICT_READ.search(line)
                    if match:
                        keys.add(match.group(2))
            self._stored_keys = (self.memory, len(self.memory), keys)
        return keys

    def _keys_ok(self, text: str) -> bool:
        """Every ``pose_dict`` string literal in ``text`` (one line, maybe ``#``-commented) that is
        not the assignment target at the line's start is a stored key, or an unfinished prefix
        of one."""
        code = text.lstrip().lstrip("#").lstrip()
        for start, arg, closed in self._string_args(self._POSE_DICT, code):
            if start == 0:
                continue  # the target of an assignment: a new key
            keys = self.stored_keys()
            if not closed:
                if not any(key.startswith(arg) for key in keys):
                    return False
            elif arg not in keys:
                return False
        return True

    # ------------------------------------------------------------------ checking
    def check(self, line: str) -> str | None:
        """None if ``line`` (or, commented, its code) is valid skill-API code; else the reason."""
        key = (line, tuple(self.objects) if self.objects is not None else None)
        checks = self._shared["checks"]
        if key not in checks:
            if len(checks) > 4096:
                checks.clear()
            checks[key] = self._check(line)
        return checks[key]

    def _check(self, line: str) -> str | None:
        from envs.skills.interpreter import CodeError, Interpreter

        if self._parser is None:
            self._parser = Interpreter(api=None)
        code = uncomment(line) if line.lstrip().startswith("#") else line
        if not code.strip():
            return "empty line"
        try:
            stmt = self._parser.parse(code)
        except CodeError as e:
            return str(e)
        if self.objects is not None:
            for node in ast.walk(stmt):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "get_actor"
                        and node.args and isinstance(node.args[0], ast.Constant)
                        and node.args[0].value not in self.objects):
                    return f"unknown object {node.args[0].value!r}; objects: {sorted(self.objects)}"
        return None


__all__ = ["PlanStep", "VLMPlanner", "PlannerStats"]
