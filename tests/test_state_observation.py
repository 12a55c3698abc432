"""The privileged ``state`` observation: HDF5 round trip, version-1 files, grounding rules, the
model's use of object poses, and a state DP acting through DPOracle in the real simulator."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from datamodules import schema
from datamodules.dataset import OracleStepDataset, dataset_files
from datamodules.dp_datamodule import DiffusionPolicyDataModule
from lightning_modules.dp.module import DiffusionPolicyModule
from lightning_modules.dp.state import MAX_OBJECTS, StateTokens, mention_roles, pose_reads, state_sample
from policies.diffusion_policy import DiffusionPolicy

TASKS = ["PlaceNextTo", "Push"]
TINY_STATE = dict(observation="state", horizon=16, d_model=64, n_heads=2, pool_blocks=1,
                  unet_channels=[32, 64, 128], step_embed_dim=32, text_encoder="minilm")


@pytest.fixture(scope="module")
def data(oracle_data):
    return oracle_data(TASKS, 2)


def test_mention_roles_follow_the_order_of_first_mention():
    names = ["blue cylinder", "red cube", "green hexagon"]
    assert mention_roles("place(get_actor('red cube'), get_actor('blue cylinder'))", names) == [2, 1, 0]
    assert mention_roles("Place the blue cylinder on top of the red cube.", names) == [1, 2, 0]
    assert mention_roles("# move3d(pose_dict['target'])", names) == [0, 0, 0]
    assert mention_roles("", names) == [0, 0, 0]


def test_pose_reads_are_distinct_ordered_and_capped():
    assert pose_reads("place(get_actor('a b'), pose_dict['target'])") == ["target"]
    assert pose_reads("move3d(pose_dict[\"x\"]); pose_dict['y'] pose_dict['x'] pose_dict['z']") == ["x", "y"]
    assert pose_reads("Push the red cube to the left.") == []


def test_state_round_trips_through_the_hdf5_schema(data, make_task_env):
    """The recorded object poses, sizes and pose_dict equal what the env and oracle produced."""
    from envs.oracle import run_oracle

    files = dataset_files(data, ["PlaceNextTo"])
    ds = OracleStepDataset(files, load_state=True, load_images=False)
    ep = ds.episodes[0]
    env = make_task_env("PlaceNextTo", 32)
    replay = run_oracle(env, ep.seed, record_obs=True)
    t = 5
    sample = ds[t]
    assert "base_rgb" not in sample
    n = len(ep.objects)
    recorded = replay.observations[t]["extra"]["object_pose"][0].numpy()
    np.testing.assert_allclose(sample["object_pose"][:n].numpy(), recorded, atol=1e-5)
    assert sample["object_mask"].tolist() == [True] * n + [False] * (MAX_OBJECTS - n)
    assert sample["object_names"].split("\n") == [o.name for o in env.unwrapped.layout.objects]
    np.testing.assert_allclose(sample["object_size"][:n, 1].numpy(),
                               [env.unwrapped.specs[o].radius for o in ep.objects], rtol=1e-6)
    assert sample["pose_keys"] == "target"
    np.testing.assert_allclose(sample["pose_values"][0].numpy(), replay.pose_dict["target"], atol=1e-5)


def test_version_1_files_are_read_but_refused_for_the_state_observation(data, tmp_path):
    """A version-1 dataset (no object poses) still serves the image DP; the state DP names the fix."""
    import shutil

    copy = tmp_path / "v1"
    shutil.copytree(data, copy)
    for path in (copy / "Push").glob("*.h5"):
        with h5py.File(path, "r+") as f:
            g = f["episode"]
            g.attrs["version"] = 1
            del g["obs/object_pose"], g["objects/radius"], g["labels/oracle/pose_keys"], g["labels/oracle/pose_values"]
    with h5py.File(copy / "Push.h5", "r+") as f:
        f.attrs["version"] = 1
    files = dataset_files(copy, ["Push"])
    assert len(OracleStepDataset(files)) > 0
    with pytest.raises(schema.SchemaError, match="version 1.*make data"):
        OracleStepDataset(files, load_state=True)


def make_module(data, conditioning="code", **model):
    dm = DiffusionPolicyDataModule(str(data), TASKS, batch_size=8, num_workers=0, val_fraction=0.5,
                                   observation="state")
    module = DiffusionPolicyModule(model={**TINY_STATE, "conditioning": conditioning, **model},
                                   optim={"lr": 1e-3, "warmup_steps": 10}, n_action_steps=8)
    module.set_stats(dm.stats())
    dm.setup()
    return module, dm


def test_conditioning_depends_on_object_poses_roles_and_targets(data):
    torch.manual_seed(0)
    module, dm = make_module(data)
    model = module.model.eval()
    ds = dm.train_set
    t = next(i for i in range(len(ds)) if "pose_dict['target']" in ds[i]["instruction"])
    batch = torch.utils.data.default_collate([ds[t]])
    with torch.no_grad():
        cond = model.condition(batch)
        moved = model.condition({**batch, "object_pose": batch["object_pose"] + torch.tensor([0.05, 0, 0, 0, 0, 0, 0])})
        retarget = model.condition({**batch, "pose_values": batch["pose_values"] + 0.05})
        renamed = model.condition({**batch, "instruction": [batch["instruction"][0].replace(
            "pose_dict['target']", "pose_dict['elsewhere']")]})
    assert cond.shape == (1, (1 + 2 + 4) * TINY_STATE["d_model"])
    for other in (moved, retarget, renamed):
        assert float((cond - other).norm() / cond.norm()) > 0.01


def test_target_tokens_carry_the_offset_from_the_named_object(data):
    """A target's features: position, offset from the TCP, offset from the role-1 object (zero
    when the text names no object); a model built without the offset (the default) drops it."""
    module, dm = make_module(data, target_object_offset=True)
    batch = torch.utils.data.default_collate([dm.train_set[i] for i in range(2)])
    names = [n.split("\n") for n in batch["object_names"]]
    keys = [k.split("\n") for k in batch["pose_keys"]]
    text = f"place(get_actor('{names[0][1]}'), pose_dict['{keys[0][0]}'])"
    tcp = torch.tensor([[0.1, -0.2, 0.3]] * 2)
    pose = batch["object_pose"].float()
    state = module.model.state
    first = torch.tensor([[False, True] + [False] * (MAX_OBJECTS - 2), [False] * MAX_OBJECTS])
    anchor = (pose[..., :3] * first[..., None]).sum(1)
    feats, mask = state._targets(batch, [text, text.replace(names[0][1], "nothing")], tcp, anchor, first.any(1))
    p = batch["pose_values"][0, 0].float()
    assert mask[0, 0] and not mask[0, 1]
    assert torch.allclose(feats[0, 0], torch.cat([p, p - tcp[0], p - pose[0, 1, :3]]) * 10.0)
    assert torch.equal(feats[1, 0, 6:], torch.zeros(3))  # no object named: no offset
    base = StateTokens(16, module.model.text.dim)
    assert base.targets[0].in_features == 6 and state.targets[0].in_features == 9


def test_state_policy_acts_through_dp_oracle_in_the_simulator(data, tmp_path):
    """A state DP exported and loaded runs closed loop through DPOracle (scene and pose_dict
    plumbing), and a state DP refuses a prediction without the scene."""
    from policies.evaluator import evaluate
    from policies.spec import PolicySpec

    module, _ = make_module(data)
    path = module.export_policy(tmp_path / "state.pt")
    dp = DiffusionPolicy.from_checkpoint(path)
    assert dp.observation == "state"
    with pytest.raises(ValueError, match="scene"):
        dp.predict_action_chunk({"qpos": np.zeros(7), "qvel": np.zeros(7), "tcp_pose": np.zeros(7),
                                 "suction": np.zeros(2), "object_pose": np.zeros((1, 7))}, "done()", "None")
    result = evaluate(PolicySpec("dp_oracle", dp=str(path)), ["PlaceNextTo"], 1, seed_start=100000,
                      workers=0, image_size=32, max_steps=20, video_episodes=0)
    (ep,) = result.episodes
    assert ep.steps == 20 and ep.failure == "step cap", (ep.failure, ep.detail)


def test_state_sample_refuses_too_many_objects():
    with pytest.raises(ValueError, match="at most"):
        state_sample(["a"] * (MAX_OBJECTS + 1), np.zeros((MAX_OBJECTS + 1, 2)), np.zeros((MAX_OBJECTS + 1, 7)), {})


@pytest.mark.slow
def test_a_tiny_state_policy_learns_to_act(oracle_data, tmp_path):
    """Learns to act: a tiny state DP trained on 5 Topple episodes succeeds in closed loop
    (DP+Oracle) on at least 4 of those 5 training seeds."""
    import lightning as L

    from policies.evaluator import evaluate
    from policies.spec import PolicySpec

    data = oracle_data(["Topple"], 5)
    torch.manual_seed(0)
    dm = DiffusionPolicyDataModule(str(data), ["Topple"], batch_size=32, num_workers=0, val_fraction=0.0,
                                   observation="state")
    module = DiffusionPolicyModule(model={**TINY_STATE, "conditioning": "code", "loss_weighting": "uniform"},
                                   optim={"lr": 1e-3, "warmup_steps": 50}, n_action_steps=8)
    module.set_stats(dm.stats())
    L.Trainer(max_steps=LEARN_STEPS, max_epochs=-1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
              limit_val_batches=0, num_sanity_val_steps=0).fit(module, datamodule=dm)
    path = module.export_policy(tmp_path / "topple.pt")
    result = evaluate(PolicySpec("dp_oracle", dp=str(path)), ["Topple"], seeds=list(range(5)), workers=0,
                      image_size=32, video_episodes=0)
    assert result.per_task["Topple"].successes >= 4, result.table_markdown()


LEARN_STEPS = 1500
