"""Named-object keypoints of the image DP (``model.object_keypoint_weight``, ``dp/keypoints.py``).

On a real oracle dataset (real simulator, real boxes), a tiny network and the real MiniLM encoder.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from configs.errors import ConfigError
from datamodules.dp_datamodule import DiffusionPolicyDataModule
from lightning_modules.dp.keypoints import NamedObjectKeypoints, named_objects
from lightning_modules.dp.module import DiffusionPolicyModule
from policies.diffusion_policy import DiffusionPolicy

TASKS = ["PlaceOnTop", "Push"]
TINY = dict(horizon=16, image_size=32, crop_ratio=1.0, resnet_width=8, image_pool="avg", d_model=64, n_heads=2,
            pool_blocks=1, unet_channels=[32, 64, 128], step_embed_dim=32, text_encoder="minilm",
            conditioning="code", loss_weighting="uniform", object_keypoint_weight=1.0)


@pytest.fixture(scope="module")
def data(oracle_data):
    return oracle_data(TASKS, 3)


def test_a_task_prompt_names_the_vocabulary_objects_it_mentions_in_order():
    """A flat DP's prompt grounds its objects as a code line's get_actor calls do."""
    assert named_objects("Place the yellow triangle behind the cyan triangle.") == ["yellow triangle", "cyan triangle"]
    assert named_objects("Push the red cube to the left.") == ["red cube"]
    assert named_objects("Stack the red cube on the blue cube, then the red cube on the green cube.") == [
        "red cube", "blue cube"]  # distinct, at most two
    assert named_objects("Place the red block on the tall cube.") == []  # not the suite's colours and shapes
    assert named_objects("Pick the redder cube.") == []  # whole words only
    assert named_objects("Push the red cube, not get_actor('blue cube')") == ["blue cube"]  # code wins


def test_named_objects_are_the_distinct_get_actor_names_in_order():
    assert named_objects("place(get_actor('red cube'), get_actor('blue cylinder'))") == ["red cube", "blue cylinder"]
    assert named_objects("move3d(get_actor('red cube'))\n# pick(get_actor(\"red cube\"))") == ["red cube"]
    assert named_objects("push(get_actor('a b'), pose_dict['goal'])") == ["a b"]  # a pose key is not an object
    assert named_objects("f(get_actor('a'), get_actor('b'), get_actor('c'))") == ["a", "b"]
    assert named_objects("move3d(pose_dict['target'])") == []  # no object named
    assert named_objects("") == [] and named_objects("done()") == []
    # with the cache info: the objects of the assignments of the keys the line reads
    info = ("pose_dict['target'] = free_space_next_to(get_actor('a'), get_actor('b'), direction='behind')\n"
            "pose_dict['goal'] = offset_pose(get_actor('c'), direction='left', distance=0.1)")
    assert named_objects("move3d(pose_dict['target'])", info) == ["a", "b"]
    assert named_objects("move3d(pose_dict['target'])") == []
    assert named_objects("place(get_actor('b'), pose_dict['target'])", info) == ["b", "a"]
    assert named_objects("push(get_actor('c'), towards=pose_dict['goal'])", info) == ["c"]
    assert named_objects("move3d(get_actor('c'))", info) == ["c"]  # reads no key
    reassigned = info + "\npose_dict['target'] = free_space_next_to(get_actor('c'), get_actor('d'), direction='left')"
    assert named_objects("move3d(pose_dict['target'])", reassigned) == ["c", "d"]  # the latest assignment, as executed


def test_pose_assignments_keep_each_keys_latest_assignment_and_its_index():
    from datamodules.labels import pose_assignments

    lines = ["pose_dict['a'] = get_pose(get_actor('x'))", "# pose_dict['b'] = get_pose(get_actor('y'))",
             "move3d(pose_dict['a'])", "  pose_dict[\"a\"] = get_pose(get_actor('z'))  ", "pose_dict['a'] == 1"]
    assert pose_assignments(lines) == {"a": (3, "pose_dict[\"a\"] = get_pose(get_actor('z'))")}
    assert pose_assignments([]) == {}


def test_pixel_grid_follows_the_crop_and_the_heatmap_loss_is_least_at_the_box_centre():
    kp = NamedObjectKeypoints((8, 16, 32), (2, 4, 8), text_dim=4, d_model=8)
    grid = kp.pixel_grid(3, 4, (5, 7), "cpu").view(3, 4, 2)
    assert grid[0, 0].tolist() == [0.5 + 7, 0.5 + 5]  # (x, y) of the first cell: its centre plus the offset
    assert grid[2, 3].tolist() == [6.5 + 7, 4.5 + 5]
    out = {"grid": (3, 4, (5, 7))}
    centre = grid[1, 2].view(1, 1, 2)
    known = torch.tensor([[True]])

    def loss(peak):
        logits = torch.full((1, 1, 12), -10.0)
        logits[0, 0, peak] = 10.0
        return float(kp.heatmap_loss(dict(out, logits=logits), centre, known))

    at = loss(1 * 4 + 2)
    assert at < loss(1 * 4 + 3) < loss(0 * 4 + 0)  # the nearer the peak, the lower
    assert float(kp.heatmap_loss(dict(out, logits=torch.zeros(1, 1, 12)), centre, ~known)) == 0.0  # nothing named


def test_peak_window_points_at_the_stronger_of_two_like_objects():
    """The whole map's expected pixel of an attention split between two objects lies between
    them; with ``peak_window`` (at test time) it is the stronger one's. A single peak gives the
    same pixel."""
    whole = NamedObjectKeypoints((8, 16, 32), (2, 4, 8), text_dim=4, d_model=8)
    peak = NamedObjectKeypoints((8, 16, 32), (2, 4, 8), text_dim=4, d_model=8, peak_window=1).eval()
    grid = whole.pixel_grid(6, 6, (0, 0), "cpu")
    logits = torch.full((1, 1, 36), -10.0)
    logits[0, 0, 1 * 6 + 1], logits[0, 0, 4 * 6 + 4] = 5.0, 4.8  # a red triangle and a red hexagon
    mean = (whole.attention(logits, 6, 6) @ grid)[0, 0]
    mode = (peak.attention(logits, 6, 6) @ grid)[0, 0]
    assert (mode - grid[7]).norm() < 0.01
    assert (mean - grid[7]).norm() > 2.0 and (mean - grid[28]).norm() > 2.0
    assert torch.equal(peak.train().attention(logits, 6, 6), whole.attention(logits, 6, 6))  # test time only
    peak.eval()
    logits[0, 0, 4 * 6 + 4] = -10.0  # one object
    assert torch.allclose(whole.attention(logits, 6, 6) @ grid, peak.attention(logits, 6, 6) @ grid, atol=1e-3)
    from configs.errors import ConfigError
    from lightning_modules.dp.model import DiffusionPolicyModel

    with pytest.raises(ConfigError, match=">= 0"):
        DiffusionPolicyModel(**{**TINY, "keypoint_peak_window": -1})


def test_homography_table_map_is_fitted_to_the_resting_objects_of_the_training_data(data, train_dp_one_step):
    """keypoint_table_map homography: the least-squares fit recovers a known projection, and
    make train-dp fits it, before training, to the recorded resting objects: within 1 cm of
    where they are, from their box centres."""
    kp = NamedObjectKeypoints((8, 16, 32), (2, 4, 8), text_dim=4, d_model=8, table_map="homography")
    assert not hasattr(kp, "to_xy")
    true = torch.tensor([[2.0, 0.3, -0.5], [-0.2, 1.5, 0.4], [0.1, -0.2, 1.0]])
    uv = torch.rand(50, 2) * 2 - 1
    p = torch.cat([uv, torch.ones(50, 1)], 1) @ true.T
    assert kp.fit_homography(uv, p[:, :2] / p[:, 2:]) < 1e-4
    assert torch.allclose(kp.homography, true / true[2, 2], atol=1e-3)
    with pytest.raises(ValueError, match="at least 4"):
        kp.fit_homography(uv[:3], uv[:3])
    dm = DiffusionPolicyDataModule(str(data), TASKS, batch_size=16, num_workers=0, load_state=True)
    uv, xy = dm.resting_object_pixels()
    assert uv.shape == xy.shape and uv.shape[1] == 2 and len(uv) > 100 and np.abs(uv).max() <= 1
    module, _, metrics = train_dp_one_step([f"DATA={data}", "DATASET=PlaceOnTop+Push", "PRESET=cpu_rgb",
                                            "model.keypoint_table_map=homography"])
    fitted = module.model.keypoints
    assert not torch.equal(fitted.homography, torch.eye(3))
    error_cm = (fitted.table_xy(torch.from_numpy(uv)) / 10 - torch.from_numpy(xy)).norm(dim=-1) * 100
    assert float(error_cm.median()) < 1.0
    assert torch.isfinite(metrics["val/keypoint_table_loss"])
    from configs.errors import ConfigError
    from lightning_modules.dp.model import DiffusionPolicyModel

    with pytest.raises(ConfigError, match="keypoint_table_map"):
        DiffusionPolicyModel(**{**TINY, "keypoint_table_map": "affine"})


def tiny_stats_and_batch(data, size: int):
    """The data's normalisation stats, and a batch of ``size`` training samples spread over the
    training set, with the recorded objects (``load_state``)."""
    dm = DiffusionPolicyDataModule(str(data), TASKS, batch_size=size, num_workers=0, load_state=True)
    stats = dm.stats()
    dm.setup()
    n = len(dm.train_set)
    return stats, torch.utils.data.default_collate([dm.train_set[i * n // size] for i in range(size)])


def tiny_module(stats, overrides: dict):
    """A TINY DP module (with ``overrides``) on ``stats``."""
    module = DiffusionPolicyModule(model={**TINY, **overrides}, optim={"lr": 1e-3, "warmup_steps": 10},
                                   n_action_steps=8)
    module.set_stats(stats)
    return module


def test_a_flat_image_dp_searches_for_the_objects_its_task_prompt_names(data):
    """With task conditioning the keypoints search for the prompt's objects (the named object
    first), and each of them is one of the scene's recorded objects, so the heatmap loss teaches it."""
    stats, batch = tiny_stats_and_batch(data, 8)
    module = tiny_module(stats, {"conditioning": "task"})
    model = module.model.eval()
    with torch.no_grad():
        kp = model._condition(batch)[3]
        heatmap, _ = model.keypoint_losses(batch, kp)
    for prompt, task, names, objects in zip(batch["prompt"], batch["task"], kp["names"], batch["object_names"]):
        assert names and prompt.startswith(f"{task.replace('PlaceOnTop', 'Place').replace('PlaceNextTo', 'Place')} "
                                           f"the {names[0]}")
        assert len(names) == (2 if task == "PlaceOnTop" else 1) and set(names) <= set(objects.split("\n"))
    assert kp["present"].any(1).all() and torch.isfinite(heatmap) and float(heatmap) > 0


def test_table_map_resting_only_is_taught_only_where_the_named_object_rests(data):
    """With ``keypoint_table_resting_only`` the table MSE counts the named objects that rest on
    the table: lifted by 10 cm, they give it nothing; without the option they still count."""
    torch.manual_seed(0)
    losses = {}
    stats, batch = tiny_stats_and_batch(data, 16)
    for resting_only in (False, True):
        module = tiny_module(stats, {"keypoint_table_resting_only": resting_only})
        model = module.model.eval()
        with torch.no_grad():
            kp = model._condition(batch)[3]
            lifted = dict(batch, object_pose=batch["object_pose"] + torch.tensor([0, 0, 0.1, 0, 0, 0, 0]))
            losses[resting_only] = [float(model.keypoint_losses(b, kp)[1]) for b in (batch, lifted)]
    assert losses[True][0] > 0 and losses[False][0] > 0 and losses[False][1] > 0
    assert losses[True][1] == 0.0


def test_keypoints_learn_to_find_the_named_object_in_the_base_image(data, tmp_path):
    """Training lowers the heatmap loss, the attention's expected pixel ends near the named
    object's box centre, and it comes from the image: another scene's images put it far off."""
    torch.manual_seed(0)
    dm = DiffusionPolicyDataModule(str(data), TASKS, batch_size=16, num_workers=0, val_fraction=0.25,
                                   load_state=True)
    module = DiffusionPolicyModule(model=TINY, optim={"lr": 1e-3, "warmup_steps": 10}, n_action_steps=8)
    module.set_stats(dm.stats())
    dm.setup()
    model = module.model
    n = len(dm.train_set)
    batch = torch.utils.data.default_collate([dm.train_set[i * n // 32] for i in range(32)])
    assert batch["object_bbox"].shape == (32, 4, 4)

    def pixel_error(b):
        """Mean distance (px) between the role-1 attention's expected pixel and the box centre."""
        with torch.no_grad():
            kp = model.eval()._condition(b)[3]
        errors = []
        for i, names in enumerate(kp["names"]):
            scene = b["object_names"][i].split("\n")
            if names and names[0] in scene:
                box = b["object_bbox"][i, scene.index(names[0])]
                centre = torch.stack([box[0] + box[2], box[1] + box[3]]) / 2
                uv_px = (kp["uv"][i, 0] + 1) / 2 * model.image_size
                errors.append(float((uv_px - centre).norm()))
        return float(np.mean(errors))

    def heatmap(b):
        with torch.no_grad():
            return float(model.keypoint_losses(b, model.eval()._condition(b)[3])[0])

    loss0, err0 = heatmap(batch), pixel_error(batch)
    model.train()
    L.Trainer(max_steps=300, max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, accelerator="cpu", devices=1, default_root_dir=tmp_path,
              limit_val_batches=0, num_sanity_val_steps=0).fit(module, datamodule=dm)
    module.swap_in_ema()
    loss1, err1 = heatmap(batch), pixel_error(batch)
    other = dict(batch, base_rgb=batch["base_rgb"].roll(16, 0))  # other scenes' base images
    err_other = pixel_error(other)
    print(f"heatmap loss {loss0:.2f} -> {loss1:.2f}; pixel error {err0:.1f} -> {err1:.1f} px "
          f"(other scenes' images {err_other:.1f} px)")
    assert loss1 < 0.7 * loss0
    assert err1 < 0.5 * err0 and err1 < 3.0  # 32 px images: objects are 4-6 px across
    assert err_other > 2 * err1
    assert {"keypoint_heatmap", "keypoint_table"} <= set(model.last_losses)


def test_memory_names_give_a_pose_dict_line_its_objects_and_targets(data):
    """With keypoint_memory_names a line that names no object but reads a pose_dict key gets the
    objects of its assignment in the cache info: as queries and as the losses' targets."""
    dm = DiffusionPolicyDataModule(str(data), TASKS, batch_size=4, num_workers=0, load_state=True)
    module = DiffusionPolicyModule(model={**TINY, "keypoint_memory_names": True},
                                   optim={"lr": 1e-3, "warmup_steps": 10}, n_action_steps=8)
    module.set_stats(dm.stats())
    dm.setup()
    model = module.model.eval()
    batch = next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=2)))
    scene = batch["object_names"][0].split("\n")
    batch["instruction"] = ["move3d(pose_dict['target'])"] * 2
    batch["cache_info"] = [f"pose_dict['target'] = free_space_next_to(get_actor('{scene[0]}'), "
                           f"get_actor('{scene[1]}'), direction='behind')", "None"]

    def losses():
        with torch.no_grad():
            kp = model._condition(batch)[3]
            heatmap, _ = model.keypoint_losses(batch, kp)
        return kp["present"], model.last_localisation[2], float(heatmap)

    present, known, heatmap = losses()
    assert present.tolist() == [[True, True], [False, False]] and known.tolist() == present.tolist()
    assert heatmap > 0
    model.keypoint_memory_names = False  # the line alone names nothing
    present, known, heatmap = losses()
    assert not present.any() and not known.any() and heatmap == 0.0


def test_a_keypoint_policy_acts_from_the_images_alone(data, tmp_path, make_task_env):
    """At test time the keypoints need no boxes or poses: the line's names and the images."""
    from envs.tabletop import observation_arrays

    dm = DiffusionPolicyDataModule(str(data), TASKS, batch_size=16, num_workers=0, load_state=True)
    module = DiffusionPolicyModule(model=TINY, optim={"lr": 1e-3, "warmup_steps": 10}, n_action_steps=8)
    module.set_stats(dm.stats())
    policy = DiffusionPolicy.from_checkpoint(module.export_policy(tmp_path / "p.pt"))
    assert policy.model.keypoints is not None
    obs = observation_arrays(make_task_env("PlaceOnTop", 32).reset(seed=0)[0])
    a = policy.predict_action_chunk(obs, "pick(get_actor('red cube'))", "None")
    b = policy.predict_action_chunk(obs, "done()", "None")  # names nothing: no keypoint tokens
    assert a.shape == b.shape == (16, 7) and np.isfinite(a).all()
    # make eval PEAK_WINDOW=2: the test-time peak window replaces the checkpoint's (0), for
    # policies with keypoints only
    from policies.spec import PolicySpec, PolicySpecError, build_policy

    assert policy.model.keypoints.peak_window == 0
    built = build_policy(PolicySpec("dp_oracle", dp=str(tmp_path / "p.pt"), options={"keypoint_peak_window": 2}))
    assert built.dp.model.keypoints.peak_window == 2
    plain = DiffusionPolicyModule(model={**TINY, "object_keypoint_weight": 0.0}, n_action_steps=8)
    plain.set_stats(dm.stats())
    plain.export_policy(tmp_path / "plain.pt")
    with pytest.raises(PolicySpecError, match="no named-object keypoints"):
        build_policy(PolicySpec("flat_dp", dp=str(tmp_path / "plain.pt"), options={"keypoint_peak_window": 2}))
    with pytest.raises(PolicySpecError, match="no code targets"):
        build_policy(PolicySpec("dp_oracle", dp=str(tmp_path / "p.pt"), options={"keypoint_target_hold": True}))
    # make eval HOLD_TARGETS=true: the episode's estimates are kept per assignment, until reset
    targets = DiffusionPolicyModule(model={**TINY, "keypoint_targets": True}, n_action_steps=8)
    targets.set_stats(dm.stats())
    targets.export_policy(tmp_path / "targets.pt")
    held = build_policy(PolicySpec("dp_oracle", dp=str(tmp_path / "targets.pt"),
                                   options={"keypoint_target_hold": True})).dp
    info = "pose_dict['goal'] = offset_pose(get_actor('red cube'), direction='left', distance=0.1)"
    held.predict_action_chunk(obs, "push(get_actor('red cube'), towards=pose_dict['goal'])", info)
    assert list(held.held_targets) == [info]
    held.reset()
    assert held.held_targets == {}


def test_keypoints_are_for_the_image_dp_and_need_the_boxes(data, train_dp_one_step):
    from configs.errors import ConfigError
    from lightning_modules.dp.model import DiffusionPolicyModel

    with pytest.raises(ConfigError, match="image DP"):
        DiffusionPolicyModel(**{**TINY, "observation": "state"})
    with pytest.raises(ConfigError, match="image DP"):
        DiffusionPolicyModel(**{**TINY, "conditioning": "none"})
    with pytest.raises(ConfigError, match="must be >= 0"):
        DiffusionPolicyModel(**{**TINY, "object_keypoint_weight": -1.0})
    dm = DiffusionPolicyDataModule(str(data), TASKS, batch_size=4, num_workers=0)  # without load_state
    module = DiffusionPolicyModule(model=TINY, optim={"lr": 1e-3, "warmup_steps": 10}, n_action_steps=8)
    module.set_stats(dm.stats())
    dm.setup()
    with pytest.raises(KeyError, match="load_state"):
        module.model.loss(next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=4))))
    # make train-dp turns load_state on for it, and validation reports the first-step figures
    module, dm, metrics = train_dp_one_step([f"DATA={data}", "DATASET=PlaceOnTop+Push", "PRESET=cpu_rgb"])  # preset: on
    assert dm.load_state and module.model.keypoints is not None
    assert metrics["val/first_step_object_distance_cm"] > 1.0
    assert torch.isfinite(metrics["val/first_step_object_error_cm"])
    assert torch.isfinite(metrics["val/keypoint_heatmap_loss"]) and torch.isfinite(metrics["val/keypoint_table_loss"])


def test_target_queries_read_the_assignment_of_each_key_a_line_reads():
    from lightning_modules.dp.targets import target_queries

    info = ("pose_dict['goal'] = offset_pose(get_actor('red cube'), direction='left', distance=0.1)\n"
            "pose_dict['target'] = free_space_next_to(get_actor('a b'), get_actor('c d'), direction='behind')\n"
            "pose_dict['goal'] = offset_pose(get_actor('blue cube'), direction='front', distance=0.05)")
    (target,) = target_queries("move3d(pose_dict['target'])", info)
    assert target == {"key": "target", "objects": ["a b", "c d"], "direction": "behind", "distance": None,
                      "code": info.splitlines()[1]}
    (goal,) = target_queries("push(get_actor('blue cube'), towards=pose_dict['goal'])", info)
    assert goal["objects"] == ["blue cube"] and goal["direction"] == "front" and goal["distance"] == 0.05
    assert target_queries("move3d(pose_dict['elsewhere'])", info) == [None]
    assert target_queries("pick(get_actor('red cube'))", info) == []
    assert target_queries("move3d(pose_dict['target'])", "None") == [None]


def test_code_targets_learn_an_offset_by_direction_and_are_taught_by_the_recorded_pose(data, train_dp_one_step):
    """keypoint_targets: the head places a pose_dict position from the keypoints' anchor and the
    assignment's direction (it fits anchor + 0.8 dm * direction), its loss counts only keys that
    were recorded, and make train-dp trains it on the Push data (whose push line reads 'goal')."""
    from envs.skills.api import DIRECTIONS
    from lightning_modules.dp.targets import CodeTargets

    torch.manual_seed(0)
    head = CodeTargets(d_model=16)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    names = list(DIRECTIONS)
    lines = ["move3d(pose_dict['t'])"] * 64

    def batch():
        sides = [names[i % 4] for i in range(64)]
        memory = [f"pose_dict['t'] = free_space_next_to(get_actor('a'), get_actor('b'), direction='{s}')" for s in sides]
        xy = torch.rand(64, 2, 2) * 4 - 2
        kp = {"names": [["a", "b"]] * 64, "xy": xy, "present": torch.ones(64, 2, dtype=torch.bool)}
        truth = xy[:, 1] + 0.8 * torch.tensor(np.stack([DIRECTIONS[s] for s in sides]), dtype=torch.float32)
        values = torch.zeros(64, 6, 3)
        values[:, 0, :2] = truth / 10
        return head(lines, memory, kp, torch.zeros(64, 3)), values

    first = None
    for _ in range(400):
        out, values = batch()
        loss = CodeTargets.loss(out, ["t"] * 64, values)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert out["present"][:, 0].all() and not out["present"][:, 1].any()
    assert float(loss) < 0.01 < first  # dm^2: within a few mm of the spot on the asked side
    assert float(CodeTargets.loss(out, ["other"] * 64, values)) == 0.0  # an unrecorded key teaches nothing
    module, dm, metrics = train_dp_one_step([f"DATA={data}", "DATASET=PlaceOnTop+Push", "PRESET=cpu_rgb",
                                             "model.keypoint_targets=true", "model.keypoint_target_teacher=0.15"])
    assert module.model.targets is not None and torch.isfinite(metrics["val/keypoint_target_loss"])
    rows = [s for s in (dm.train_set[i] for i in range(len(dm.train_set))) if "pose_dict['goal']" in s["instruction"]
            and not s["instruction"].startswith("pose_dict")][:4]  # Push's push line reads the goal
    model = module.model.eval()
    with torch.no_grad():
        batch = torch.utils.data.default_collate(rows)
        kp = model._condition(batch)[3]
        assert kp["targets"]["present"][:, 0].all() and kp["targets"]["keys"][0] == ["goal"]
        assert float(model.targets.loss(kp["targets"], batch["pose_keys"], batch["pose_values"])) > 0
    from configs.errors import ConfigError
    from lightning_modules.dp.model import DiffusionPolicyModel

    with pytest.raises(ConfigError, match="keypoint_targets"):
        DiffusionPolicyModel(**{**TINY, "object_keypoint_weight": 0.0, "keypoint_targets": True})


def test_code_targets_hold_each_assignments_first_estimate_and_train_on_the_recorded_value():
    """keypoint_target_hold: an assignment's first estimate stays put when its object moves (Push
    moves the very object its goal was computed from), a new assignment gets its own; the estimate
    ``xy`` still follows the keypoints. keypoint_target_teacher: training tokens are built from the
    recorded value (plus the noise), where the key was recorded."""
    from configs.errors import ConfigError
    from lightning_modules.dp.model import DiffusionPolicyModel
    from lightning_modules.dp.state import POS_SCALE
    from lightning_modules.dp.targets import CodeTargets

    torch.manual_seed(0)
    head = CodeTargets(d_model=16).eval()
    line = ["push(get_actor('a'), towards=pose_dict['goal'])"]
    first = ["pose_dict['goal'] = offset_pose(get_actor('a'), direction='left', distance=0.1)"]
    again = ["pose_dict['goal'] = offset_pose(get_actor('a'), direction='right', distance=0.1)"]

    def kp(x):
        return {"names": [["a"]], "xy": torch.tensor([[[x, 0.5]]]), "present": torch.ones(1, 1, dtype=torch.bool)}

    held = [{}]
    with torch.no_grad():
        before = head(line, first, kp(0.0), torch.zeros(1, 3), held)
        moved = head(line, first, kp(1.0), torch.zeros(1, 3), held)
        free = head(line, first, kp(1.0), torch.zeros(1, 3))
        other = head(line, again, kp(1.0), torch.zeros(1, 3), held)
    assert list(held[0]) == [first[0], again[0]]
    assert torch.equal(moved["tokens"], before["tokens"]) and not torch.equal(free["tokens"], before["tokens"])
    assert torch.allclose(moved["xy"], before["xy"] + torch.tensor([1.0, 0.0]))  # the estimate follows
    assert not torch.equal(other["tokens"], moved["tokens"]) and torch.equal(held[0][again[0]], other["xy"][0, 0])

    values = torch.tensor([[[0.3, -0.2, 0.02]]])
    with torch.no_grad():
        taught = head(line, first, kp(0.0), torch.zeros(1, 3), teacher=(["goal"], values, 1e-6))
        unrecorded = head(line, first, kp(0.0), torch.zeros(1, 3), teacher=(["elsewhere"], values, 1e-6))
        spot = values[0, 0, :2] * POS_SCALE
        expected = (head.token(torch.cat([spot, spot])[None, None]) + head.slot)[:, :1]
    assert torch.allclose(taught["tokens"][:, :1], expected, atol=1e-4)
    assert torch.equal(taught["xy"], before["xy"]) and torch.equal(unrecorded["tokens"], before["tokens"])
    for bad, match in (({"keypoint_target_hold": True}, "keypoint_targets"),
                       ({"keypoint_target_teacher": 0.1}, "keypoint_targets"),
                       ({"keypoint_targets": True, "keypoint_target_teacher": -1.0}, ">= 0")):
        with pytest.raises(ConfigError, match=match):
            DiffusionPolicyModel(**{**TINY, **bad})


def test_the_code_targets_loss_follows_the_anchor_that_moved_since_the_assignment(data):
    """Push's goal was computed from the object's position before the push; the dataset records
    the objects' positions at the assignment (``pose_object_xy``), and ``anchor_moved`` is zero
    until the object moves and then its displacement, so the head is taught the goal's offset from
    the anchor as it was when the goal was computed."""
    from datamodules.dataset import OracleStepDataset
    from lightning_modules.dp.targets import anchor_moved

    ds = OracleStepDataset([str(data / "Push.h5")], load_images=False, load_state=True, assignment_objects=True)
    assert "pose_object_xy" not in OracleStepDataset([str(data / "Push.h5")], load_images=False, load_state=True)[0]
    with pytest.raises(ConfigError, match="needs load_state"):
        OracleStepDataset([str(data / "Push.h5")], load_images=False, assignment_objects=True)
    ep = ds.episodes[0]
    assert ep.pose_assigned_t == [0] and ep.labels[0].startswith("pose_dict['goal'] =")
    moved = []
    for t in range(ep.length):
        s = ds[t]
        out = {"keys": [["goal"]], "anchors": [[ep.objects[0], None]]}
        m = anchor_moved(out, [s["object_names"]], s["object_pose"][None], [s["pose_keys"]], s["pose_object_xy"][None])
        shift = (s["object_pose"][0, :2] - torch.from_numpy(ds._arrays(ep)["obs/object_pose"][0, 0, :2])) * 10
        assert torch.allclose(m[0, 0], shift, atol=1e-5) and not m[0, 1].any()
        moved.append(float(m[0, 0].norm()))
    assert moved[0] == 0.0 and max(moved) > 0.8  # dm: the push moved it about 10 cm
    gone = {"keys": [["goal"]], "anchors": [["no such object", None]]}
    assert not anchor_moved(gone, [s["object_names"]], s["object_pose"][None], [s["pose_keys"]],
                            s["pose_object_xy"][None]).any()
