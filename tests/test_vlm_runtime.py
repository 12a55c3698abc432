"""The planner's forward passes (policies/vlm_runtime.py) against the transformers model itself.

A real tiny random-init LLaVA (CLIP + Phi-3, the cpu preset's architecture at test size, with
grouped-query attention in one variant): the lean runtime's logits equal the library's, row by
row of a left-padded batch with rejected columns; the pixel lookup table equals the processor.
"""

import copy

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datamodules.vqa import code_question
from lightning_modules.vlm.model import build_tiny, tiny_processor
from lightning_modules.vlm.tokenizer import train_tokenizer
from policies.vlm_runtime import HFLlava, KVBatch, LeanLlava, PixelTable, make_runtime

TINY = {"image_size": 32, "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "patch_size": 8},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 512}, "vision_feature_layer": -1}
LINES = ["move3d(get_actor('red cube'))", "pick(get_actor('red cube'))", "place(get_actor('red cube'), "
         "get_actor('blue cylinder'))"]


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def parts(request):
    corpus = LINES + [code_question("Stack the red cube on the blue cylinder.", LINES[:i]) for i in range(3)]
    processor = tiny_processor(train_tokenizer(corpus, 300, 1), 32, 8)
    cfg = copy.deepcopy(TINY)
    cfg["text"]["num_key_value_heads"] = request.param
    return build_tiny(OmegaConf.create(cfg), processor).eval(), processor


def library_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of the library model on one unpadded sequence (T, vocab)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("kind", [LeanLlava, HFLlava])
def test_batched_forward_equals_the_library_row_by_row(parts, kind):
    model, processor = parts
    assert LeanLlava.supports(model) and isinstance(make_runtime(model), LeanLlava)
    rt = kind(model)
    tok = processor.tokenizer
    texts = ["Task: stack\nMemory:\nNone\n", "Task: place it\nMemory:\n" + LINES[0] + "\n",
             "Task: x\nMemory:\n" + "\n".join(LINES) + "\n"]
    seqs = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        prefixes = []
        for ids in seqs:  # single-row prefix caches, as the planner keeps them
            kv = KVBatch.empty(rt, "cpu", capacity=4)  # grows
            rt.forward(kv, rt.embed(torch.tensor([ids])), torch.tensor([len(ids)]), keep=0)
            prefixes.append(kv)
        kv = KVBatch.stack(prefixes, extra=4)  # left-padded, buffers grow below
        new = [tok("pick(", add_special_tokens=False)["input_ids"],
               tok("move3d(get", add_special_tokens=False)["input_ids"], tok("#", add_special_tokens=False)["input_ids"]]
        width = max(map(len, new))
        ids = torch.tensor([n + [0] * (width - len(n)) for n in new])
        logits = rt.forward(kv, rt.embed(ids), torch.tensor([len(n) for n in new]), keep=width)
        for r, (seq, n) in enumerate(zip(seqs, new)):
            ref = library_logits(model, seq + n)
            torch.testing.assert_close(logits[r, : len(n)], ref[-len(n):], atol=1e-4, rtol=1e-4)
        # reject the last token of row 1 (a draft that failed), then one more token per row
        kv.reject(1, 1)
        step = [tok("'", add_special_tokens=False)["input_ids"][:1]] * 3
        logits = rt.forward(kv, rt.embed(torch.tensor(step)), torch.tensor([1, 1, 1]), keep=1)
        kept = [new[0], new[1][:-1], new[2]]
        for r, (seq, n) in enumerate(zip(seqs, kept)):
            ref = library_logits(model, seq + n + step[r])
            torch.testing.assert_close(logits[r, 0], ref[-1], atol=1e-4, rtol=1e-4)
        assert kv.lengths.tolist() == [len(s) + len(n) + 1 for s, n in zip(seqs, kept)]
        sub = kv.select([2])  # row 2 on its own goes on as in the batch
        logits = rt.forward(sub, rt.embed(torch.tensor([step[2]])), torch.tensor([1]), keep=1)
        ref = library_logits(model, seqs[2] + kept[2] + step[2] * 2)
        torch.testing.assert_close(logits[0, 0], ref[-1], atol=1e-4, rtol=1e-4)


def test_lean_vision_features_equal_the_library(parts):
    model, _ = parts
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(LeanLlava(model).image_features(pixels), HFLlava(model).image_features(pixels))


def test_pixel_table_is_the_processor_to_the_bit(parts):
    _, processor = parts
    table = PixelTable.build(processor.image_processor, (32, 32))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ref = processor.image_processor(images=list(images), return_tensors="np")["pixel_values"]
    assert table is not None and np.array_equal(table(images), ref)
    assert PixelTable.build(processor.image_processor, (48, 48)) is None  # resized: not elementwise


def test_unsupported_decoders_use_the_library(parts):
    model, _ = parts
    other = copy.deepcopy(model)
    other.config.text_config.sliding_window = 8
    assert not LeanLlava.supports(other) and type(make_runtime(other)) is HFLlava
    assert type(make_runtime(model, lean=False)) is HFLlava
