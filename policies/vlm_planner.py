"""The code VLM at inference time (paper 4.2, "Efficient Inference"): a planner with a memory.

::

    planner = VLMPlanner.from_pretrained("outputs/vlm/cpu/export")   # or a run folder / .ckpt
    planner.reset("Place the red cube on top of the blue cylinder.")
    step = planner.step(image)          # (H, W, 3) uint8 base camera -> PlanStep (VLM + DP mode)
    step = planner.next_key_step(image) # key-step request (VLM + Oracle mode)
    planner.memory, planner.cache_info  # key-step lines so far; ExtractMemoryInfo for the DP

Memory rule (the one ``datamodules.labels.memories`` used to build the training prompts): a
generated line is appended when it is a key-step, i.e. not commented out, and only then; equal
consecutive key-steps are appended again, as in the oracle traces.

Decoding is greedy and bounded by ``max_new_tokens``. Early stopping: in ``step`` mode, once the
first ``early_stop_k`` generated characters equal those of ``"# " + memory[-1]`` (the commented
last key-step), decoding stops and that commented line is returned. Prefix KV caching: the prompt
is ``template(Task + Memory + <image> [+ request])``; the part before the image depends only on the
task and the memory, so its KV cache is computed once per memory state and reused (cropped back
to the prefix) at every control step.

Object-constrained decoding (``constrain_objects``, not in the paper): when the caller gives the
scene's object names, the string argument of ``get_actor('...')`` may only spell one of them,
and one line may not name the same object twice (no skill takes an object twice);
at each token the best-scoring token that keeps the line consistent with that rule is taken
(greedy decoding otherwise untouched). The skill API can only resolve objects of the scene, so
this restricts decoding to lines the API accepts, as grammar-constrained decoding does. Why: the
paper's pretrained Phi-3 copies the names of the prompt reliably; the tiny random-init cpu-preset
model often mixes a colour of one object with the shape of another (measured in the README).

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
from datamodules.labels import commented, extract_memory_info, is_key_step, uncomment
from datamodules.vqa import PromptFormat, code_question


@dataclass
class PlanStep:
    line: str            # the generated code line (key-step, or '# '-commented non-key-step)
    key_step: bool       # not commented out
    new_key_step: bool   # a key-step that was appended to memory at this call
    error: str | None    # None if the line parses as skill-API code; else why
    tokens: int          # new tokens decoded for this call
    early_stopped: bool


@dataclass
class PlannerStats:
    calls: int = 0
    tokens: int = 0           # tokens decoded (generated), over all calls
    prefill_tokens: int = 0   # prompt tokens run through the model (prefix cache hits excluded)
    early_stops: int = 0
    errors: int = 0
    per_call: list = field(default_factory=list)


class VLMPlanner:
    """Greedy code generation with a key-step memory (see the module docstring).

    ``model``: ``LlavaForConditionalGeneration``; ``processor``: its ``LlavaProcessor``.
    ``constrain_objects``: object-constrained decoding when ``reset`` is given the scene's objects.
    """

    def __init__(self, model, processor, prompt_template: str = PromptFormat.template, early_stop_k: int = 6,
                 max_new_tokens: int = 96, use_prefix_cache: bool = True, device: str = "cpu",
                 constrain_objects: bool = True):
        self.model = model.to(device).eval()
        self.processor = processor
        self.tok = processor.tokenizer
        self.fmt = PromptFormat(prompt_template)
        self.early_stop_k = int(early_stop_k)
        self.max_new_tokens = int(max_new_tokens)
        self.use_prefix_cache = bool(use_prefix_cache)
        self.constrain_objects = bool(constrain_objects)
        self.device = torch.device(device)
        self._pixel_dtype = next(model.model.vision_tower.parameters()).dtype
        self._parser = None
        self.task_prompt = ""
        self.objects: list[str] | None = None
        self.memory: list[str] = []
        self.stats = PlannerStats()
        self._prefix_ids: list[int] | None = None
        self._cache = None

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

    # ------------------------------------------------------------------ episode state
    def reset(self, task_prompt: str, objects: list[str] | None = None) -> None:
        """Start an episode: empty memory. ``objects``: the scene's object names, if known, to
        flag ``get_actor`` calls of other objects (and, with ``constrain_objects``, to decode
        only those names)."""
        self.task_prompt = str(task_prompt)
        self.objects = list(objects) if objects is not None else None
        self.memory = []
        self._prefix_ids, self._cache = None, None

    @property
    def cache_info(self) -> str:
        return extract_memory_info(self.memory)

    def step(self, image: np.ndarray) -> PlanStep:
        """VLM + DP mode: the code line for this control step; updates the memory."""
        target = commented(self.memory[-1]) if self.memory else None
        return self._plan(image, request=False, stop_target=target)

    def next_key_step(self, image: np.ndarray) -> PlanStep:
        """VLM + Oracle mode: ask with the key-step request for the next key-step line."""
        return self._plan(image, request=True, stop_target=None)

    # ------------------------------------------------------------------ decoding
    def _plan(self, image: np.ndarray, request: bool, stop_target: str | None) -> PlanStep:
        ids: list[int] = []
        early = False
        k = min(self.early_stop_k, len(stop_target)) if stop_target and self.early_stop_k > 0 else 0
        checking = k > 0
        finished = False
        for token in self._token_stream(image, request):
            if token == self.tok.eos_token_id:
                ids.append(token)
                finished = True
                break
            ids.append(token)
            if checking:
                text = self.tok.decode(ids, skip_special_tokens=True)
                if len(text) >= k:
                    if text[:k] == stop_target[:k]:
                        early = True
                        break
                    checking = False
                elif not stop_target.startswith(text):
                    checking = False
            if len(ids) >= self.max_new_tokens:
                break
        line = stop_target if early else self.tok.decode(ids, skip_special_tokens=True).strip()
        error = self.check(line)
        if error is None and not early and not finished:
            error = f"no end of line within max_new_tokens={self.max_new_tokens}"
        key = is_key_step(line)
        if key:
            self.memory.append(line)
        s = self.stats
        s.calls += 1
        s.tokens += len(ids)
        s.early_stops += early
        s.errors += error is not None
        s.per_call.append(len(ids))
        return PlanStep(line=line, key_step=key, new_key_step=key, error=error, tokens=len(ids), early_stopped=early)

    def _prompt_parts(self, request: bool) -> tuple[str, str]:
        question = code_question(self.task_prompt, self.memory, request, image_token=self.processor.image_token)
        return self.fmt.split_at_image(self.fmt.prompt(question), self.processor.image_token)

    @torch.no_grad()
    def _token_stream(self, image: np.ndarray, request: bool) -> Iterator[int]:
        """Greedy tokens, one forward pass each, computed lazily (stop consuming to stop)."""
        prefix, rest = self._prompt_parts(request)
        prefix_ids = self.tok(prefix, add_special_tokens=False)["input_ids"]
        if self.tok.bos_token_id is not None:
            prefix_ids = [self.tok.bos_token_id] + prefix_ids
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

    _GET_ACTOR = re.compile(r"get_actor\(")

    def _choose(self, logits: torch.Tensor, generated: list[int], candidates: int = 256) -> int:
        """Greedy choice; with object-constrained decoding, the best token whose text keeps every
        ``get_actor('...`` argument a prefix of a scene object's name (or exactly one, closed)."""
        token = int(logits.argmax())
        if not (self.constrain_objects and self.objects):
            return token
        if self._names_ok(self.tok.decode(generated + [token], skip_special_tokens=True)):
            return token
        for t in logits.topk(min(candidates, logits.numel())).indices.tolist():
            if self._names_ok(self.tok.decode(generated + [t], skip_special_tokens=True)):
                return int(t)
        return token  # nothing fits: leave it to the checker to report

    def _names_ok(self, text: str) -> bool:
        """Every ``get_actor`` string literal in ``text`` (one line) names a scene object, each
        a different one (no skill takes the same object twice: ``place(a, a)`` is refused by the
        API), or is an unfinished prefix of such a name."""
        used: set[str] = set()
        for match in self._GET_ACTOR.finditer(text):
            rest = text[match.end():]
            if not rest or rest[0] not in "'\"":
                continue  # not a string literal (or not yet): unconstrained
            quote, arg = rest[0], rest[1:]
            end = arg.find(quote)
            free = [name for name in self.objects if name not in used]
            if end < 0:
                if not any(name.startswith(arg) for name in free):
                    return False
            elif arg[:end] not in free:
                return False
            else:
                used.add(arg[:end])
        return True

    # ------------------------------------------------------------------ checking
    def check(self, line: str) -> str | None:
        """None if ``line`` (or, commented, its code) is valid skill-API code; else the reason."""
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
