"""B policies acting at once (policies/batching.py, episodes.run_batched, evaluate(envs_per_worker=B)).

Real tiny checkpoints (a random-init state DP conditioned on code, a random-init tiny VLM export)
in the real simulator: the per-seed results of B environments per process equal those of one
episode at a time with the reference decoding (today's evaluator), and the batched DP chunk is
each row's own chunk.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datamodules.vqa import code_question
from policies.batching import ChunkRequest, act, act_batch, serve
from policies.diffusion_policy import DiffusionPolicy
from policies.episodes import cached_env, run_batched, run_episode
from policies.evaluator import evaluate
from policies.spec import PolicySpec, build_policies, build_policy
from policies.vlm_planner import VLMPlanner

TINY_DP = dict(conditioning="code", observation="state", horizon=8, d_model=32, n_heads=2, pool_blocks=1,
               unet_channels=(16, 32, 64), step_embed_dim=16)
TINY_VLM = {"image_size": 32, "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "patch_size": 8},
            "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 512}, "vision_feature_layer": -1}
TASKS = ["PlaceOnTop", "Push"]
SEEDS = [100000, 100001, 100002]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(dp policy file, VLM export folder): tiny and random, in the formats `make eval` loads."""
    from lightning_modules.dp.model import DiffusionPolicyModel
    from lightning_modules.dp.module import POLICY_FORMAT
    from lightning_modules.vlm.model import build_tiny, export_vlm, tiny_processor
    from lightning_modules.vlm.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny_ckpts")
    torch.manual_seed(0)
    dp = DiffusionPolicyModel(**TINY_DP)
    torch.save({"format": POLICY_FORMAT, "version": 1, "model": TINY_DP, "n_action_steps": 4,
                "state_dict": dp.state_dict()}, folder / "dp.pt")
    lines = ["move3d(get_actor('red cube'))", "pick(get_actor('red cube'))", "push(get_actor('red cube'))"]
    corpus = lines + [code_question("Place the red cube on top of the blue cylinder.", lines[:i]) for i in range(3)]
    processor = tiny_processor(train_tokenizer(corpus, 300, 1), 32, 8)
    export_vlm(build_tiny(OmegaConf.create(TINY_VLM), processor), processor, folder / "vlm",
               {"early_stop_k": 2, "max_new_tokens": 10})
    return str(folder / "dp.pt"), str(folder / "vlm")


def spec_of(checkpoints, **options):
    return PolicySpec("vlm_dp", dp=checkpoints[0], vlm=checkpoints[1], options={"device": "cpu", **options})


def outcome(result):
    return (result.task, result.seed, result.success, result.steps, result.failure, result.detail, result.stats)


def test_predict_many_gives_each_row_its_own_chunk(checkpoints, make_task_env):
    env = make_task_env("PlaceOnTop", 32)
    dps = [DiffusionPolicy.from_checkpoint(checkpoints[0])]
    dps += [dps[0].fork() for _ in range(2)]
    from envs.tabletop import observation_arrays

    observations, scenes = [], []
    for seed in (0, 1, 2):
        obs, _ = env.reset(seed=seed)
        observations.append(observation_arrays(obs))
        specs = [env.unwrapped.specs[o.name] for o in env.unwrapped.layout.objects]
        scenes.append({"names": [s.name for s in specs], "sizes": [(s.height, s.radius) for s in specs],
                       "pose_dict": {}})
    texts = ["move3d(get_actor('red cube'))", "# pick(get_actor('blue cylinder'))", "done()"]
    infos = ["None", "pose_dict['target'] = free_space(get_actor('red cube'))", "None"]
    for dp in dps:
        dp.reset()
    batch = DiffusionPolicy.predict_many(dps, observations, texts, infos, scenes)
    alone = DiffusionPolicy.from_checkpoint(checkpoints[0])
    for i in range(3):
        alone.reset()
        chunk = alone.predict_action_chunk(observations[i], texts[i], infos[i], scene=scenes[i])
        np.testing.assert_allclose(batch[i], chunk, atol=1e-4)
        assert batch[i].shape == (8, 7)
    assert not np.allclose(batch[0], batch[1])  # different rows, different chunks
    for dp in dps[:1]:  # a batch of one is the single call, to the bit
        dp.reset()
        one = serve([ChunkRequest(dp, observations[0], texts[0], infos[0], scenes[0])])[0]
        alone.reset()
        np.testing.assert_array_equal(one, alone.predict_action_chunk(observations[0], texts[0], infos[0],
                                                                      scene=scenes[0]))


def test_act_batch_equals_acting_one_by_one(checkpoints, make_task_env):
    """Three VLM+DP policies (shared networks) stepped together through act_batch take the
    actions that each takes alone through act, step after step in the simulator."""
    spec = spec_of(checkpoints)
    together, alone = build_policies(spec, 3), build_policies(spec, 3)
    envs = [[cached_env(t, 32, slot=10 * g + s) for s, t in enumerate(["PlaceOnTop", "Push", "PlaceOnTop"])]
            for g in range(2)]  # one env per policy
    observations = []
    from envs.tabletop import observation_arrays

    for group, policies in zip(envs, (together, alone)):
        obs = []
        for env, policy, seed in zip(group, policies, (5, 6, 7)):
            o, _ = env.reset(seed=seed)
            policy.attach(env.unwrapped)
            policy.reset(env.unwrapped.task_name, env.unwrapped.prompt())
            obs.append(o)
        observations.append(obs)
    for _ in range(6):
        a = act_batch([p.act_steps(observation_arrays(o)) for p, o in zip(together, observations[0])])
        b = [act(p.act_steps(observation_arrays(o))) for p, o in zip(alone, observations[1])]
        for i in range(3):
            np.testing.assert_allclose(a[i], b[i], atol=1e-4)
            observations[0][i] = envs[0][i].step(a[i])[0]
            observations[1][i] = envs[1][i].step(b[i])[0]
    assert [p.instruction for p in together] == [p.instruction for p in alone]
    assert [p.stats() for p in together] == [p.stats() for p in alone]


def test_batched_evaluation_equals_todays_per_seed(checkpoints, monkeypatch):
    """B = 1 and B = 3 environments per process give, seed by seed, what today's evaluator gives:
    one episode at a time (run_episode) with the reference decoding. The DP chunks of the three
    slots are predicted together (held back until every slot waits on one)."""
    sizes = {"chunk": [], "plan": []}
    for name, cls, method in (("chunk", DiffusionPolicy, "predict_many"), ("plan", VLMPlanner, "plan_many")):
        def counted(*args, _f=getattr(cls, method), _n=name):
            sizes[_n].append(len(args[0]))
            return _f(*args)
        monkeypatch.setattr(cls, method, staticmethod(counted))
    spec = spec_of(checkpoints)
    kwargs = dict(max_steps=10, stop_on_success=True)
    today = build_policy(spec)
    today.planner.fast = False  # the reference decoding: one library forward per token
    jobs = [(t, s, False) for t in TASKS for s in SEEDS]
    reference = [outcome(run_episode(cached_env(t, 32), today, s, **kwargs)[0]) for t, s, _ in jobs]
    assert any(r[6]["chunks"] > 1 for r in reference) and all(r[6]["vlm_tokens"] > 0 for r in reference)
    for b in (1, 3):
        found = run_batched(build_policies(spec, b), jobs, lambda slot, task: cached_env(task, 32, slot=slot),
                            **kwargs)
        assert [outcome(found[i][0]) for i in range(len(jobs))] == reference, b
    assert max(sizes["chunk"]) == 3 and sizes["chunk"].count(3) >= 3 and max(sizes["plan"]) == 3
    res = evaluate(spec, TASKS, seeds=SEEDS, image_size=32, envs_per_worker=2, video_episodes=1, **kwargs)
    assert [outcome(e) for e in res.episodes] == reference
    assert [(v.task, v.seed) for v in res.videos] == [(t, SEEDS[0]) for t in TASKS]
    with pytest.raises(TypeError, match="PolicySpec"):
        evaluate(today, TASKS, seeds=SEEDS, image_size=32, envs_per_worker=2)


@pytest.mark.slow
def test_batched_workers_equal_one_process(checkpoints):
    """Two spawned workers with two environments each, taking jobs from one queue."""
    spec = spec_of(checkpoints)
    kwargs = dict(seeds=SEEDS, image_size=32, max_steps=8, video_episodes=0)
    one = evaluate(spec, TASKS, **kwargs)
    two = evaluate(spec, TASKS, workers=2, envs_per_worker=2, **kwargs)
    assert [outcome(e) for e in two.episodes] == [outcome(e) for e in one.episodes]


def test_envs_per_worker_option_of_make_eval(checkpoints, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "evaluate.py"), "POLICY=vlm_dp",
                           f"DP={checkpoints[0]}", f"VLM={checkpoints[1]}", "TASKS=Push", "EPISODES=2", "WORKERS=0",
                           "ENVS_PER_WORKER=2", "MAX_STEPS=5", "DEVICE=cpu", f"OUT={out}"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "envs_per_worker: 2" in (out / "config.yaml").read_text()
    assert (out / "results.csv").read_text().splitlines()[1].startswith("Push,2,")
    bad = subprocess.run([sys.executable, str(root / "scripts" / "evaluate.py"), "POLICY=oracle", "ENVS_PER_WORKER=0",
                          f"OUT={tmp_path / 'bad'}"], cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "envs_per_worker" in bad.stderr
