"""Forward passes of the code VLM for the planner's fast queries: batched, with a KV cache of its own.

The planner (``policies.vlm_planner``) asks three things of the model, for B rows at once:
``image_features`` of base images, ``embed`` of token ids, and ``forward`` of new input
embeddings over a :class:`KVBatch`, appending their keys and values. Two runtimes do this:

* :class:`LeanLlava` computes LLaVA (CLIP vision tower, projector, Phi-3 decoder) from the model's
  own weights with plain ``torch`` calls. It runs the same operations as ``transformers`` in the
  same order (``tests/test_vlm_planner.py`` compares the logits), without the per-call overhead
  of the library's module wrappers, output capturing and mask construction, which is most of
  the cost of the tiny cpu-preset model (measured: 6.6 ms for the 76 image and answer-prefix
  tokens of one query against 3.7 ms here, one thread). In the last decoder layer only the rows
  whose logits are asked for (``keep``) go through attention output, MLP and ``lm_head``: the
  other rows' keys and values are all that later tokens read of that layer.
* :class:`HFLlava` calls the ``transformers`` model with a ``DynamicCache`` built from the batch,
  for any architecture (GPUs, the paper preset when it is not a plain Phi-3 + CLIP).

:func:`make_runtime` picks the lean one when the model is a plain (merged) LLaVA with a CLIP or
other vision tower and a Phi-3 decoder with the default RoPE, and the library one otherwise.

:class:`KVBatch` holds B sequences of different lengths in buffers ``(B, kv_heads, capacity,
head_dim)`` per layer, left-padded: rows start at different columns, and a ``valid`` mask
``(B, capacity)`` marks the columns that hold a real token (padding and rejected draft tokens are
invalid). Every row's next token goes into the same column; its RoPE position is the row's own
count of real tokens (``lengths``). Attention reads the valid columns up to the query's own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------- KV cache
class KVBatch:
    """Keys and values of B token sequences (see the module docstring).

    ``layers``: per decoder layer ``(keys, values)``, each ``(B, kv_heads, capacity, head_dim)``;
    ``valid`` ``(B, capacity)`` bool; ``size``: columns written so far; ``lengths`` ``(B,)`` long:
    real tokens per row (the next token's RoPE position).
    """

    def __init__(self, layers, valid: torch.Tensor, size: int, lengths: torch.Tensor):
        self.layers, self.valid, self.size, self.lengths = layers, valid, int(size), lengths

    @property
    def rows(self) -> int:
        return int(self.valid.shape[0])

    @classmethod
    def empty(cls, runtime, device, capacity: int = 256) -> "KVBatch":
        """One row, no tokens yet, room for ``capacity`` columns (it grows when needed)."""
        layers = []
        for k, _ in runtime.empty(device):
            shape = (1, k.shape[1], int(capacity), k.shape[3])
            layers.append((k.new_zeros(shape), k.new_zeros(shape)))
        return cls(layers, torch.zeros(1, capacity, dtype=torch.bool, device=device), 0,
                   torch.zeros(1, dtype=torch.long, device=device))

    @classmethod
    def stack(cls, prefixes: list["KVBatch"], extra: int) -> "KVBatch":
        """A batch (a copy) of single-row caches without holes (the planners' prefixes), left-padded
        to the longest, with room for ``extra`` more columns."""
        n = [p.size for p in prefixes]
        width, rows = max(n), len(prefixes)
        k0 = prefixes[0].layers[0][0]
        cap = width + int(extra)
        layers = []
        for layer in range(len(prefixes[0].layers)):
            shape = (rows, k0.shape[1], cap, k0.shape[3])
            keys, values = k0.new_zeros(shape), k0.new_zeros(shape)
            for r, p in enumerate(prefixes):
                keys[r, :, width - n[r]:width] = p.layers[layer][0][0, :, : n[r]]
                values[r, :, width - n[r]:width] = p.layers[layer][1][0, :, : n[r]]
            layers.append((keys, values))
        valid = torch.zeros(rows, cap, dtype=torch.bool, device=k0.device)
        for r in range(rows):
            valid[r, width - n[r]:width] = True
        return cls(layers, valid, width, torch.tensor(n, dtype=torch.long, device=k0.device))

    def crop(self, n: int) -> None:
        """Keep the first ``n`` columns (of a batch without holes before them): back to a prefix."""
        self.valid[:, n:] = False
        self.size = int(n)
        self.lengths = self.valid[:, :n].sum(1)

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` more columns (the buffers double when full)."""
        cap = self.valid.shape[1]
        if self.size + columns <= cap:
            return
        new = max(2 * cap, self.size + columns)
        pad = new - cap
        self.layers = [(F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))) for k, v in self.layers]
        self.valid = F.pad(self.valid, (0, pad))

    def select(self, rows: list[int]) -> "KVBatch":
        """A batch of the given rows only (copies)."""
        if rows == list(range(self.rows)):
            return self
        idx = torch.tensor(rows, dtype=torch.long, device=self.valid.device)
        layers = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.layers]
        return KVBatch(layers, self.valid.index_select(0, idx), self.size, self.lengths.index_select(0, idx))

    def reject(self, row: int, count: int) -> None:
        """Forget the last ``count`` real tokens of ``row`` (rejected draft tokens)."""
        if count <= 0:
            return
        cols = self.valid[row, : self.size].nonzero().flatten()[-count:]
        self.valid[row, cols] = False
        self.lengths[row] -= count

    def _append(self, n_new: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Claim ``columns`` columns; row b's first ``n_new[b]`` are real. Returns the positions
        ``(B, columns)`` and the attention mask ``(B, 1, columns, size)`` (True = attend)."""
        self.reserve(columns)
        start = self.size
        ar = torch.arange(columns, device=self.valid.device)
        self.valid[:, start:start + columns] = ar[None, :] < n_new[:, None]
        positions = self.lengths[:, None] + ar[None, :]
        self.lengths = self.lengths + n_new
        self.size = start + columns
        cols = torch.arange(self.size, device=self.valid.device)
        causal = cols[None, :] <= (start + ar)[:, None]  # (columns, size)
        mask = self.valid[:, None, : self.size] & causal[None]
        return positions, mask[:, None]


# ---------------------------------------------------------------------------- runtimes
def _layer_norm(norm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class HFLlava:
    """The ``transformers`` model behind the runtime interface (any architecture)."""

    lean = False

    def __init__(self, model):
        self.model = model
        lm = model.model.language_model
        self.language_model = lm
        self.dtype = lm.embed_tokens.weight.dtype
        self.image_token_id = int(model.config.image_token_id)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` long -> ``(B, T, hidden)``."""
        return self.language_model.embed_tokens(ids)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, image_tokens, hidden)`` (vision tower + projector)."""
        out = self.model.model.get_image_features(pixel_values=pixels)
        feats = getattr(out, "pooler_output", out)
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def forward(self, kv: KVBatch, embeds: torch.Tensor, n_new: torch.Tensor, keep: int) -> torch.Tensor | None:
        """Run ``embeds`` ``(B, T, hidden)`` (row b's first ``n_new[b]`` real) after ``kv`` and append
        them to it; returns the logits ``(B, keep, vocab)`` of the last ``keep`` columns (None if 0)."""
        from transformers import DynamicCache

        size = kv.size
        cache = DynamicCache(ddp_cache_data=[(k[:, :, :size], v[:, :, :size]) for k, v in kv.layers])
        positions, _ = kv._append(n_new, embeds.shape[1])
        out = self.language_model(inputs_embeds=embeds, attention_mask=kv.valid[:, : kv.size].long(),
                                  position_ids=positions, past_key_values=cache, use_cache=True)
        for (k, v), layer in zip(kv.layers, cache.layers):
            k[:, :, size:kv.size] = layer.keys[:, :, size:]
            v[:, :, size:kv.size] = layer.values[:, :, size:]
        if keep <= 0:
            return None
        return self.model.lm_head(out.last_hidden_state[:, -keep:])

    def empty(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A cache of no tokens (per layer ``(1, kv_heads, 0, head_dim)``)."""
        cfg = self.language_model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        z = torch.zeros(1, heads, 0, head_dim, dtype=self.dtype, device=device)
        return [(z, z) for _ in range(cfg.num_hidden_layers)]


class LeanLlava(HFLlava):
    """LLaVA with a Phi-3 decoder computed directly from the model's weights (see the module
    docstring). The vision tower is computed here when it is CLIP, else by the library."""

    lean = True

    def __init__(self, model):
        super().__init__(model)
        lm = self.language_model
        cfg = lm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5
        self.inv_freq = lm.rotary_emb.inv_freq
        self.attention_scaling = float(lm.rotary_emb.attention_scaling)
        self.act = lm.layers[0].mlp.activation_fn
        self.layers = [(l.input_layernorm, l.self_attn.qkv_proj.weight, l.self_attn.o_proj.weight,
                        l.post_attention_layernorm, l.mlp.gate_up_proj.weight, l.mlp.down_proj.weight)
                       for l in lm.layers]
        vcfg = model.config.vision_config
        tower = model.model.vision_tower
        layer = model.config.vision_feature_layer
        projector = model.model.multi_modal_projector
        self.clip = (getattr(vcfg, "model_type", "") == "clip_vision_model" and isinstance(layer, int)
                     and hasattr(tower, "embeddings") and hasattr(tower, "pre_layrnorm")
                     and all(hasattr(projector, n) for n in ("linear_1", "act", "linear_2")))
        if self.clip:
            n = len(tower.encoder.layers)
            self.vision_layers = list(tower.encoder.layers)[: layer % (n + 1)]
            self.drop_cls = model.config.vision_feature_select_strategy == "default"

    @staticmethod
    def supports(model) -> bool:
        """A plain LLaVA whose decoder is Phi-3 with the default RoPE and no sliding window."""
        try:
            cfg = model.config.text_config
            lm = model.model.language_model
        except AttributeError:
            return False
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        return (getattr(cfg, "model_type", "") == "phi3" and rope == "default"
                and getattr(cfg, "sliding_window", None) is None and type(lm).__name__ == "Phi3Model"
                and all(type(l.self_attn.qkv_proj) is torch.nn.Linear for l in lm.layers))

    # ---------------------------------------------------------------- vision
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.clip:
            return super().image_features(pixels)
        tower = self.model.model.vision_tower
        e = tower.embeddings
        x = F.conv2d(pixels.to(e.patch_embedding.weight.dtype), e.patch_embedding.weight, e.patch_embedding.bias,
                     stride=e.patch_embedding.stride).flatten(2).transpose(1, 2)
        x = torch.cat([e.class_embedding.expand(x.shape[0], 1, -1), x], 1) + e.position_embedding.weight[None]
        x = _layer_norm(tower.pre_layrnorm, x)
        for layer in self.vision_layers:
            a, mlp = layer.self_attn, layer.mlp
            y = _layer_norm(layer.layer_norm1, x)
            B, N, C = y.shape
            q = F.linear(y, a.q_proj.weight, a.q_proj.bias).view(B, N, a.num_heads, -1).transpose(1, 2)
            k = F.linear(y, a.k_proj.weight, a.k_proj.bias).view(B, N, a.num_heads, -1).transpose(1, 2)
            v = F.linear(y, a.v_proj.weight, a.v_proj.bias).view(B, N, a.num_heads, -1).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, scale=a.scale).transpose(1, 2).reshape(B, N, C)
            x = x + F.linear(o, a.out_proj.weight, a.out_proj.bias)
            y = _layer_norm(layer.layer_norm2, x)
            y = F.linear(mlp.activation_fn(F.linear(y, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
            x = x + y
        if self.drop_cls:
            x = x[:, 1:]
        p = self.model.model.multi_modal_projector
        return F.linear(p.act(F.linear(x, p.linear_1.weight, p.linear_1.bias)), p.linear_2.weight, p.linear_2.bias)

    # ---------------------------------------------------------------- decoder
    @staticmethod
    def _rms(norm, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        d = cos.shape[-1]
        rot, rest = x[..., :d], x[..., d:]
        half = d // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat([(rot * cos) + (rotated * sin), rest], dim=-1)

    def forward(self, kv: KVBatch, embeds: torch.Tensor, n_new: torch.Tensor, keep: int) -> torch.Tensor | None:
        B, T, _ = embeds.shape
        start = kv.size
        positions, mask = kv._append(n_new, T)
        freqs = positions[..., None].float() * self.inv_freq.to(embeds.device)[None, None]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(embeds.dtype)[:, None]
        sin = (emb.sin() * self.attention_scaling).to(embeds.dtype)[:, None]
        H, KH, D = self.heads, self.kv_heads, self.head_dim
        x = embeds
        last = len(self.layers) - 1
        for i, (norm1, qkv_w, o_w, norm2, gate_up_w, down_w) in enumerate(self.layers):
            h = self._rms(norm1, x)
            qkv = F.linear(h, qkv_w)
            qk = self._rotate(qkv[..., : (H + KH) * D].view(B, T, H + KH, D).transpose(1, 2), cos, sin)
            q, k = qk[:, :H], qk[:, H:]  # RoPE is elementwise per head: query and key heads at once
            v = qkv[..., (H + KH) * D:].view(B, T, KH, D).transpose(1, 2)
            keys, values = kv.layers[i]
            keys[:, :, start:kv.size] = k
            values[:, :, start:kv.size] = v
            if i == last:  # only the rows whose logits are asked for read this layer's output
                if keep <= 0:
                    return None
                q, x, m = q[:, :, -keep:], x[:, -keep:], mask[:, :, -keep:]
            else:
                m = mask
            ks, vs = keys[:, :, : kv.size], values[:, :, : kv.size]
            if KH != H:
                ks, vs = ks.repeat_interleave(H // KH, dim=1), vs.repeat_interleave(H // KH, dim=1)
            o = F.scaled_dot_product_attention(q, ks, vs, attn_mask=m, scale=self.scaling)
            x = x + F.linear(o.transpose(1, 2).reshape(B, q.shape[2], H * D), o_w)
            gate, up = F.linear(self._rms(norm2, x), gate_up_w).chunk(2, dim=-1)
            x = x + F.linear(up * self.act(gate), down_w)
        return self.model.lm_head(self._rms(self.language_model.norm, x))


def make_runtime(model, lean: bool = True):
    """:class:`LeanLlava` when ``lean`` and the model is supported, else :class:`HFLlava`."""
    return LeanLlava(model) if lean and LeanLlava.supports(model) else HFLlava(model)


# ---------------------------------------------------------------------------- image preprocessing
class PixelTable:
    """The processor's image normalisation as a lookup table, where it is elementwise.

    When base images already have the processor's crop size (no resize, no crop), CLIP-style
    preprocessing maps each uint8 value of each channel to one float: the table ``(256, 3)`` is
    read off the processor itself, from one image that holds every value in every channel, so
    the result is the processor's to the bit (checked on a second image). Otherwise ``None``
    comes back from :meth:`build` and the planner calls the processor.
    """

    def __init__(self, table: np.ndarray, size: tuple[int, int]):
        self.table, self.size = table, size

    @classmethod
    def build(cls, image_processor, size: tuple[int, int]) -> "PixelTable | None":
        h, w = size
        if h * w < 256:
            return None
        values = (np.arange(h * w) % 256).astype(np.uint8).reshape(h, w)
        probe = np.stack([values, np.roll(values, 7), np.roll(values, 101)], -1)
        try:
            out = np.asarray(image_processor(images=probe, return_tensors="np")["pixel_values"][0])
        except Exception:  # noqa: BLE001: a processor that cannot take this image: no table
            return None
        if out.shape != (3, h, w):
            return None  # resized or cropped: not elementwise
        table = np.zeros((256, 3), out.dtype)
        for c in range(3):
            table[probe[..., c].ravel(), c] = out[c].ravel()
        self = cls(table, size)
        check = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(image_processor(images=check, return_tensors="np")["pixel_values"][0])
        return self if np.array_equal(self(check[None])[0], ref) else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float, equal to the processor's output."""
        return self.table[images, np.arange(3)].transpose(0, 3, 1, 2)


__all__ = ["KVBatch", "HFLlava", "LeanLlava", "make_runtime", "PixelTable"]
