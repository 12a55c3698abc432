"""VLMPlanner logic: memory rule, early stopping, key-step mode, malformed lines, prefix KV cache.

The logic tests replace the model's greedy token stream by a scripted one (allowed: they test
our decoding logic, not the model); the cache test runs a real tiny random-init LLaVA.
"""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datamodules.labels import extract_memory_info, memories, step_labels
from datamodules.vqa import code_question
from lightning_modules.vlm.model import build_tiny, tiny_processor
from lightning_modules.vlm.tokenizer import train_tokenizer
from policies.vlm_planner import VLMPlanner

TRACE = step_labels(
    ["pose_dict['target'] = free_space_next_to(get_actor('red cube'), get_actor('blue cylinder'), direction='left')",
     "move3d(get_actor('red cube'))", "move3d(get_actor('red cube'))", "move3d(get_actor('red cube'))",
     "move3d(get_actor('red cube'))", "pick(get_actor('red cube'))", "pick(get_actor('red cube'))",
     "move3d(pose_dict['target'])", "place(get_actor('red cube'), pose_dict['target'])", "done()"],
    [True, True, False, False, True, True, False, True, True, True])  # a repeated move3d key-step
IMAGE = np.zeros((32, 32, 3), dtype=np.uint8)
TINY = {"image_size": 32, "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "patch_size": 8},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 512}, "vision_feature_layer": -1}


@pytest.fixture(scope="module")
def parts():
    corpus = TRACE + [code_question("Place the red cube to the left of the blue cylinder.", m) for m in memories(TRACE)]
    processor = tiny_processor(train_tokenizer(corpus, 300, 1), 32, 8)
    model = build_tiny(OmegaConf.create(TINY), processor)
    return model, processor


class Scripted(VLMPlanner):
    """A planner whose 'model' emits scripted lines, token by token (counts what it consumed)."""

    def __init__(self, parts, lines, **kw):
        super().__init__(*parts, fast=False, **kw)  # the reference decoding reads _token_stream
        self.lines = list(lines)
        self.consumed = 0
        self.requests = []

    def _token_stream(self, image, request):
        self.requests.append(request)
        ids = self.tok(self.lines.pop(0), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        for t in ids:
            self.consumed += 1
            yield t


def test_memory_rule_matches_training_memories(parts):
    planner = Scripted(parts, TRACE, early_stop_k=0)
    planner.reset("Place the red cube to the left of the blue cylinder.")
    expected = memories(TRACE) + [[x for x in TRACE if not x.startswith("#")]]
    for t, label in enumerate(TRACE):
        assert planner.memory == expected[t]
        assert planner.cache_info == extract_memory_info(expected[t])
        step = planner.step(IMAGE)
        assert step.line == label and step.error is None and not step.early_stopped
        assert step.key_step == step.new_key_step == (not label.startswith("#"))
    assert planner.memory == expected[-1]
    assert planner.memory.count("move3d(get_actor('red cube'))") == 2  # repeated key-steps are kept
    assert planner.cache_info.startswith("pose_dict['target'] = ")
    planner.reset("again")
    assert planner.memory == [] and planner.cache_info == "None"


def test_early_stop_returns_the_commented_last_key_step(parts):
    last = "move3d(get_actor('red cube'))"
    full = Scripted(parts, ["# " + last], early_stop_k=0)
    full.reset("p")
    full.memory = [last]
    ref = full.step(IMAGE)
    for k in (2, 6, 12):
        planner = Scripted(parts, ["# " + last + " and then garbage that is never decoded"], early_stop_k=k)
        planner.reset("p")
        planner.memory = [last]
        step = planner.step(IMAGE)
        assert step.early_stopped and step.line == "# " + last and step.error is None
        assert not step.key_step and not step.new_key_step and planner.memory == [last]
        assert step.tokens == planner.consumed < ref.tokens
        text = planner.tok.decode(planner.tok(step.line)["input_ids"][: step.tokens])
        assert len(text) >= k and len(planner.tok.decode(planner.tok(step.line)["input_ids"][: step.tokens - 1])) < k
    assert ref.tokens == full.consumed and not ref.early_stopped and ref.line == "# " + last


def test_no_early_stop_on_a_different_line_or_empty_memory(parts):
    planner = Scripted(parts, ["# pick(get_actor('red cube'))", "pick(get_actor('red cube'))",
                               "# move3d(get_actor('red cube'))"], early_stop_k=6)
    planner.reset("p")
    planner.memory = ["move3d(get_actor('red cube'))"]
    a = planner.step(IMAGE)  # commented, but not the last key-step: "# pick" != "# move"
    assert not a.early_stopped and a.line == "# pick(get_actor('red cube'))" and not a.key_step
    b = planner.step(IMAGE)  # a new key-step
    assert not b.early_stopped and b.new_key_step and planner.memory[-1] == "pick(get_actor('red cube'))"
    c = planner.step(IMAGE)  # commented move3d no longer matches the last key-step (pick)
    assert not c.early_stopped and c.line == "# move3d(get_actor('red cube'))"
    planner = Scripted(parts, ["# move3d(get_actor('red cube'))"], early_stop_k=6)
    planner.reset("p")
    assert not planner.step(IMAGE).early_stopped  # nothing to compare with


def test_key_step_mode_asks_with_the_request_and_appends(parts):
    planner = Scripted(parts, ["move3d(get_actor('red cube'))", "pick(get_actor('red cube'))"])
    planner.reset("Pick up the red cube.")
    s1, s2 = planner.next_key_step(IMAGE), planner.next_key_step(IMAGE)
    assert planner.requests == [True, True]
    assert s1.new_key_step and s2.new_key_step and planner.memory == [s1.line, s2.line]
    prefix, rest = planner._prompt_parts(request=True)
    assert "Please give a keystep reply" in rest and "pick(get_actor('red cube'))" in prefix


@pytest.mark.parametrize("line, reason", [
    ("move3d(get_actor('red cube')", "not parseable"),
    ("fly(get_actor('red cube'))", "not a skill"),
    ("pick(teleport('red cube'))", "unknown function"),
    ("import os", "not allowed"),
    ("# fly(get_actor('red cube'))", "not a skill"),
    ("pick(get_actor('green hexagon'))", "unknown object"),
])
def test_malformed_lines_are_flagged_not_executed(parts, line, reason):
    planner = Scripted(parts, [line])
    planner.reset("p", objects=["red cube", "blue cylinder"])
    step = planner.step(IMAGE)
    assert step.line == line and step.error is not None and reason in step.error


def test_unknown_object_needs_the_scene_objects(parts):
    planner = Scripted(parts, ["pick(get_actor('green hexagon'))"])
    planner.reset("p")  # objects unknown: only the syntax and the API are checked
    assert planner.step(IMAGE).error is None


@pytest.mark.parametrize("text, ok", [
    ("pick(get_actor('", True), ("pick(get_actor('blu", True), ("pick(get_actor('blue cylinder'))", True),
    ("pick(get_actor('red", False), ("pick(get_actor('blue cube')", False), ("pick(get_actor('blue cylinderx", False),
    ("place(get_actor('red cube'), get_actor('blue cylinder'))", False),  # an earlier argument counts too
    ("place(get_actor('blue cylinder'), get_actor('blue", False),  # the same object twice in one line
    ("place(get_actor('blue cylinder'), get_actor('green cube'))", True),
    ("place(get_actor('blue cylinder'), get_actor(\"gr", True), ("move3d(get_actor(name))", True),
    ("move3d(pose_dict['target'])", True),
])
def test_object_constraint_accepts_only_scene_names(parts, text, ok):
    planner = VLMPlanner(*parts)
    planner.reset("p", objects=["blue cylinder", "green cube"])
    assert planner._names_ok(text) is ok


@pytest.mark.parametrize("text, ok", [
    ("place(get_actor('blue cylinder'), pose_dict['", True), ("move3d(pose_dict['gre", True),
    ("move3d(pose_dict['green cube'])", True), ("place(get_actor('green cube'), pose_dict['free'])", True),
    ("move3d(pose_dict['blue", False),  # the first object's colour, as the tiny VLM writes on Swap
    ("move3d(pose_dict['green cubex", False), ("move3d(pose_dict['fre'])", False),
    ("# move3d(pose_dict['blue cube'])", False),  # commented: the same rule
    ("pose_dict['blue cylinder'] = get_pose(get_actor('blue cylinder'))", True),  # a new key is stored
    ("# pose_dict['x", True), ("pose_dict['a'] = pose_dict['b", False), ("move3d(pose_dict[key])", True),
])
def test_pose_dict_reads_spell_stored_keys(parts, text, ok):
    planner = VLMPlanner(*parts)
    planner.reset("p", objects=["blue cylinder", "green cube"])
    planner.memory = ["pose_dict['green cube'] = get_pose(get_actor('green cube'))",
                      "pose_dict['free'] = free_space(get_actor('blue cylinder'))", "move3d(pose_dict['free'])"]
    assert planner.stored_keys() == {"green cube", "free"}
    assert planner._keys_ok(text) is ok


def test_stored_keys_follow_the_memory_as_it_grows_and_resets(parts):
    planner = VLMPlanner(*parts)
    planner.reset("p", objects=["blue cylinder", "green cube"])
    assert planner.stored_keys() == set() and not planner._keys_ok("move3d(pose_dict['free'])")
    planner.memory.append("pose_dict['free'] = free_space(get_actor('blue cylinder'))")
    assert planner.stored_keys() == {"free"} and planner._keys_ok("move3d(pose_dict['free'])")
    other = planner.fork()  # its own, empty memory; the parent's keys stay
    assert other.stored_keys() == set() and planner.stored_keys() == {"free"}
    planner.reset("p", objects=["blue cylinder", "green cube"])
    planner.memory.append("pose_dict['green cube'] = get_pose(get_actor('green cube'))")  # same length as before
    assert planner.stored_keys() == {"green cube"}


def test_constrained_choice_takes_the_best_valid_token(parts):
    """Scores favour a token that starts a name not in the scene: the constrained choice takes the
    best-scoring token that still spells a scene object; unconstrained greedy keeps the argmax."""
    model, processor = parts
    tok = processor.tokenizer
    generated = tok("pick(get_actor('", add_special_tokens=False)["input_ids"]
    objects = ["blue cylinder"]
    planner = VLMPlanner(model, processor)
    planner.reset("p", objects=objects)
    base = tok.decode(generated)

    def extends(t):
        return tok.decode(generated + [t])[len(base):]

    vocab = range(len(tok))
    bad = next(t for t in vocab if extends(t).startswith("red"))
    good = next(t for t in vocab if extends(t).strip() and "blue cylinder".startswith(extends(t)))
    logits = torch.zeros(len(tok))
    logits[bad], logits[good] = 10.0, 5.0
    assert planner._choose(logits, generated) == good
    planner.reset("p")  # no scene objects: plain greedy
    assert planner._choose(logits, generated) == bad
    free = VLMPlanner(model, processor, constrain_objects=False)
    free.reset("p", objects=objects)
    assert free._choose(logits, generated) == bad


def test_required_key_step_never_starts_a_comment(parts):
    """next_key_step(require_key_step=True): the first token is the best one that starts no
    comment (a VLM trained with unfinished requests may prefer "# <running line>"); later tokens
    and other queries are untouched."""
    model, processor = parts
    tok = processor.tokenizer
    vocab = range(len(tok))
    hash_ = next(t for t in vocab if tok.decode([t]).lstrip().startswith("#"))
    good = next(t for t in vocab if tok.decode([t]).startswith("move"))
    logits = torch.zeros(len(tok))
    logits[hash_], logits[good] = 10.0, 5.0
    planner = VLMPlanner(model, processor)
    planner.reset("p")
    assert planner._choose(logits, []) == hash_  # a plain query: greedy
    planner._key_step_only = True  # what next_key_step(require_key_step=True) sets for its query
    assert planner._choose(logits, []) == good
    assert planner._choose(logits, [good]) == hash_  # only the first token is constrained
    # the real queries: fast and reference decoding agree, the flag is cleared afterwards
    lines = []
    for fast in (True, False):
        p = VLMPlanner(model, processor, fast=fast)
        p.reset("Place the red cube to the left of the blue cylinder.")
        step = p.next_key_step(IMAGE, require_key_step=True)
        assert not step.line.lstrip().startswith("#") and not p._key_step_only
        lines.append(step.line)
    assert lines[0] == lines[1]
    # batched (a make-eval worker with several environments): per row, as next_key_step does
    from policies.batching import PlanRequest

    rows = [VLMPlanner(model, processor) for _ in range(2)]
    for p in rows:
        p.reset("Place the red cube to the left of the blue cylinder.")
    both = PlanRequest.run_many([PlanRequest(rows[0], IMAGE, keystep=True, require_key_step=True),
                                 PlanRequest(rows[1], IMAGE, keystep=True)])
    assert both[0].line == lines[0] and not any(p._key_step_only for p in rows)


def test_max_new_tokens_bounds_decoding(parts):
    planner = Scripted(parts, ["move3d(get_actor('red cube'))"], max_new_tokens=3)
    planner.reset("p")
    step = planner.step(IMAGE)
    assert step.tokens == 3 and step.error is not None


def test_prefix_cache_gives_the_same_lines_with_less_prefill(parts):
    model, processor = parts
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(4, 32, 32, 3), dtype=np.uint8)
    out = {}
    for cache in (False, True):
        planner = VLMPlanner(model, processor, early_stop_k=0, max_new_tokens=8, use_prefix_cache=cache, fast=False)
        planner.reset("Place the red cube to the left of the blue cylinder.")
        lines = []
        for im in images:  # the same memory at every step (random lines would change it)
            planner.memory = list(TRACE[:2])
            lines.append(planner.step(im).line)
        out[cache] = (lines, planner.stats.prefill_tokens, planner.stats.tokens)
    assert out[True][0] == out[False][0] and out[True][2] == out[False][2]
    assert out[True][1] < out[False][1]
    # logits agree too: the cached prefix + suffix equals the whole prompt
    planner = VLMPlanner(model, processor, use_prefix_cache=True)
    planner.reset("p")
    prefix, rest = planner._prompt_parts(False)
    ids = [processor.tokenizer.bos_token_id] + processor.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    enc = processor(text=rest, images=images[0], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        whole = model(input_ids=torch.cat([torch.tensor([ids]), enc["input_ids"]], 1), pixel_values=enc["pixel_values"])
        pre = model(input_ids=torch.tensor([ids]), use_cache=True)
        part = model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"], past_key_values=pre.past_key_values)
    torch.testing.assert_close(whole.logits[0, -1], part.logits[0, -1], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- fast queries
PROMPT = "Place the red cube to the left of the blue cylinder."
KEYS = [x for x in TRACE if not x.startswith("#")]


def bright(on: bool, rng) -> np.ndarray:
    """A noisy 32 px image, bright or dark: the trained model's cue (see ``trained``)."""
    return np.clip((190 if on else 60) + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def trained(parts):
    """The tiny LLaVA trained for a few seconds on one rule: with a bright image it answers the
    commented last key-step of its memory, with a dark one the next key-step of TRACE. Fast and
    reference decoding then meet what they meet in rollouts: early stops, drafts rejected at the
    first token, and new lines decoded token by token."""
    import copy

    from datamodules.vqa import PromptFormat

    model, processor = copy.deepcopy(parts[0]), parts[1]
    tok, rng = processor.tokenizer, np.random.default_rng(0)
    samples = []
    for t in range(1, len(KEYS)):
        for on in (True, False):
            answer = "# " + KEYS[t - 1] if on else KEYS[t]
            enc = processor(text=PromptFormat().prompt(code_question(PROMPT, KEYS[:t])), images=bright(on, rng),
                            add_special_tokens=False, return_tensors="pt")
            a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = [tok.bos_token_id] + enc["input_ids"][0].tolist() + a
            samples.append((ids, [-100] * (len(ids) - len(a)) + a, enc["pixel_values"][0]))
    n = max(len(s[0]) for s in samples)
    ids = torch.tensor([s[0] + [tok.pad_token_id] * (n - len(s[0])) for s in samples])
    labels = torch.tensor([s[1] + [-100] * (n - len(s[1])) for s in samples])
    mask = (torch.arange(n)[None] < torch.tensor([len(s[0]) for s in samples])[:, None]).long()
    pixels = torch.stack([s[2] for s in samples])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(70):
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), processor


def closed_loop(planner, images, objects=None):
    """Steps on the planner's own memory: (line, tokens, early stop) per image."""
    planner.reset(PROMPT, objects=objects)
    return [(s.line, s.tokens, s.early_stopped) for s in map(planner.step, images)]


@pytest.mark.parametrize("early_stop_k, objects", [(2, None), (6, ["red cube", "blue cylinder"]), (0, None)])
def test_fast_queries_give_the_reference_tokens(trained, early_stop_k, objects):
    """Token for token the greedy output of the reference decoding (one library forward per
    token), with early stops, verified drafts and new lines, in fewer forward passes."""
    rng = np.random.default_rng(1)
    images = [bright(t % 4 != 0, rng) for t in range(14)]
    images[5] = images[4].copy()  # an unchanged image: its vision features are reused
    runs = {}
    for fast in (False, True):
        planner = VLMPlanner(*trained, early_stop_k=early_stop_k, max_new_tokens=40, fast=fast)
        runs[fast] = (closed_loop(planner, images, objects), planner.stats)
    (ref, ref_stats), (fast, fast_stats) = runs[False], runs[True]
    assert fast == ref
    lines = [x[0] for x in ref]
    assert sum(not x.startswith("#") for x in lines) >= 3 and sum(x.startswith("#") for x in lines) >= 6
    if early_stop_k:
        assert sum(x[2] for x in ref) >= 6
    assert fast_stats.tokens == ref_stats.tokens and fast_stats.errors == ref_stats.errors
    assert fast_stats.forwards < 0.7 * ref_stats.forwards  # drafts verified in the prefill pass
    assert fast_stats.accepted > 0 and fast_stats.vision_reuses == 1
    assert fast_stats.prefill_tokens < ref_stats.prefill_tokens  # the prefix grows incrementally


def test_plan_many_batches_give_each_planner_its_own_answer(trained):
    """Five forks with different memories, images and request kinds, as one call: the same
    PlanSteps as each planner alone (fast and reference) and their memories updated. The one
    with a far longer memory is decoded apart from the others (no padding to its length)."""
    rng = np.random.default_rng(2)
    base = VLMPlanner(*trained, early_stop_k=2, max_new_tokens=40)
    planners = [base.fork() for _ in range(5)]
    alone = [VLMPlanner(*trained, early_stop_k=2, max_new_tokens=40, fast=fast) for fast in (True, False)]
    setups = [(KEYS[:1], True, False), (KEYS[:3], False, False), (KEYS[:2], False, True), (KEYS[:4], True, False),
              (KEYS * 6, True, False)]
    images = [bright(on, rng) for _, on, _ in setups]
    for p, (memory, _, _) in zip(planners, setups):
        p.reset(PROMPT)
        p.memory = list(memory)
    for _ in range(2):  # the second round: grown memories, the same images (vision reuse)
        expected = []
        for p, image, (_, _, request) in zip(planners, images, setups):
            steps = []
            for single in alone:
                single.reset(PROMPT)
                single.memory = list(p.memory)
                steps.append(single.next_key_step(image) if request else single.step(image))
            assert (steps[0].line, steps[0].tokens) == (steps[1].line, steps[1].tokens)
            expected.append((steps[0], single.memory))
        got = VLMPlanner.plan_many(planners, images, [r for _, _, r in setups])
        for p, step, (want, memory) in zip(planners, got, expected):
            assert (step.line, step.tokens, step.early_stopped, step.error) == \
                (want.line, want.tokens, want.early_stopped, want.error)
            assert p.memory == memory
    assert any(s.early_stopped for s in got) and any(s.new_key_step for s in got)
    assert sum(p.stats.vision_reuses for p in planners) == 5
    assert planners[4]._kv.size > 4 * planners[3]._kv.size
    assert base.memory == [] and base.stats.calls == 0  # forks do not touch each other


def test_fast_queries_of_a_random_model_match_token_for_token(parts):
    """A random-init model (long garbage lines up to max_new_tokens, object-constrained): the
    same tokens fast, batched and reference, the prefix grown from a common token prefix."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, size=(3, 32, 32, 3), dtype=np.uint8)
    out = {}
    for fast in (False, True):
        planner = VLMPlanner(*parts, early_stop_k=6, max_new_tokens=12, fast=fast)
        planner.reset(PROMPT, objects=["red cube", "blue cylinder"])
        lines = []
        for t, im in enumerate(images):
            planner.memory = list(KEYS[:t + 1])  # the memory grows by one line per step
            s = planner.step(im)
            lines.append((s.line, s.tokens, s.error))
        out[fast] = lines
    assert out[True] == out[False]
    assert all(tokens == 12 for _, tokens, _ in out[False])  # no EOS: every token was decoded


def test_a_prompt_that_outgrows_the_model_ends_the_episode_as_context_full(parts):
    """Each step appends a new key-step; once prompt + max_new_tokens exceeds the model's 512
    positions, check_context (and VLMDP before its query) raises PolicyFailure "context full"."""
    from policies.base import PolicyFailure
    from policies.vlm_dp import VLMDP

    class HoldDP:
        horizon, n_action_steps = 4, 1

        def reset(self):
            pass

        def predict_action_chunk(self, observation, instruction, cache_info):
            return np.zeros((4, 7), np.float32)

    lines = [f"move3d(get_actor('red cube'), {i})" for i in range(200)]
    planner = Scripted(parts, lines, max_new_tokens=32)
    assert planner.max_positions == 512
    policy = VLMDP(planner, HoldDP(), keystep_on_hold=False)  # plain queries, as sizes counts them
    policy.reset("PlaceNextTo", "Place the red cube to the left of the blue cylinder.")
    sizes = []
    with pytest.raises(PolicyFailure) as failure:
        for _ in range(200):
            sizes.append(planner.prompt_tokens(IMAGE))
            policy.act({"base_rgb": IMAGE})
    assert failure.value.reason == "context full"
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)  # the memory grew at every step
    assert sizes[-1] + 32 > 512 >= sizes[-2] + 32  # it stopped at the first query that would not fit
    assert len(planner.memory) == len(sizes) - 1
