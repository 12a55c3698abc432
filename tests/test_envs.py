"""The task suite on the real simulator: resets, observations, seeds, suction, errors."""

import subprocess
import sys

import numpy as np
import pytest

import envs
from envs.objects import COLOURS, SHAPES
from envs.tabletop import observation_arrays


@pytest.mark.parametrize("task", list(envs.TASKS))
def test_every_task_resets_steps_and_evaluates(make_task_env, task):
    env = make_task_env(task)
    obs, _ = env.reset(seed=3)
    o = observation_arrays(obs)
    n = len(env.layout.objects)
    assert o["base_rgb"].shape == (64, 64, 3) and o["base_rgb"].dtype == np.uint8
    assert o["wrist_rgb"].shape == (64, 64, 3)
    assert o["qpos"].shape == (7,) and o["tcp_pose"].shape == (7,) and o["suction"].shape == (2,)
    assert o["bboxes"].shape == (n, 4)
    assert o["base_rgb"].std() > 5  # a rendered scene, not a blank image
    assert env.prompt() and env.prompt().endswith(".")
    assert not env.evaluate_success()  # no task starts solved
    for _ in range(3):
        obs, *_ = env.step(np.zeros(7, dtype=np.float32))
    assert np.all(np.isfinite(observation_arrays(obs)["qpos"]))
    assert not env.evaluate_success()


def test_object_counts_follow_the_paper(make_task_env):
    for task in envs.TASKS:
        env = make_task_env(task)
        env.reset(seed=0)
        assert len(env.layout.objects) == (1 if task in ("Push", "Topple") else 3), task
        for spec in env.layout.objects:
            assert spec.shape in SHAPES and spec.colour in COLOURS
            assert spec.name == f"{spec.colour} {spec.shape}"


def test_seeds_are_reproducible_and_distinct(make_task_env):
    env = make_task_env("PlaceOnTop")
    env.reset(seed=11)
    a = (env.layout.names, [tuple(np.round(p, 6)) for p in env.layout.poses], env.prompt())
    env.reset(seed=12)
    b = (env.layout.names, env.prompt())
    env.reset(seed=11)
    c = (env.layout.names, [tuple(np.round(p, 6)) for p in env.layout.poses], env.prompt())
    assert a == c
    assert a[0] != b[0] or a[2] != b[1]


def test_bounding_boxes_match_the_camera_view(make_task_env):
    env = make_task_env("PlaceOnTop", image_size=128)
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        boxes = observation_arrays(obs)["bboxes"]
        assert np.all(boxes >= 0) and np.all(boxes <= 128)
        assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
        ys = [env.layout.poses[i][1] for i in range(3)]
        xs = [env.layout.poses[i][0] for i in range(3)]
        cx = (boxes[:, 0] + boxes[:, 2]) / 2
        cy = (boxes[:, 1] + boxes[:, 3]) / 2
        # camera convention: +y is image right, +x (towards the camera) is image down
        assert np.all(np.argsort(ys) == np.argsort(cx))
        assert np.all(np.argsort(xs) == np.argsort(cy))


def test_bounding_box_covers_the_object_pixels(make_task_env):
    """The projected box contains the object's colour in the rendered base image."""
    env = make_task_env("Push", image_size=128)
    obs, _ = env.reset(seed=0)
    o = observation_arrays(obs)
    x0, y0, x1, y1 = o["bboxes"][0].round().astype(int)
    colour = np.array(COLOURS[env.layout.objects[0].colour][:3]) * 255
    img = o["base_rgb"].astype(float)
    inside = img[y0:y1, x0:x1].reshape(-1, 3)
    assert np.min(np.linalg.norm(inside - colour, axis=1)) < 90
    outside = img.copy()
    outside[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = 0
    # no other pixel far from the box looks like the lit object
    assert (np.linalg.norm(outside - colour, axis=1 if outside.ndim == 2 else 2) < 40).sum() < 5


def test_suction_attaches_only_on_contact_and_releases(make_task_env):
    from envs.skills import SkillAPI

    env = make_task_env("Pick")
    env.reset(seed=0)
    m = SkillAPI(env).motion
    name = env.layout.params["obj"]
    env.step(m.action(np.zeros(3), True))  # suction on in mid-air: nothing attaches
    assert env.suction.on and env.suction.attached is None
    top = m.top(name)
    for _ in range(60):
        env.step(m.toward(np.array([*m.xy(name), top - 0.01]), 0.02, True))
        if env.suction.attached:
            break
    assert env.suction.attached == name
    for _ in range(10):
        env.step(m.toward(m.tcp() + [0, 0, 0.1], 0.02, True))
    assert m.bottom(name) > 0.04  # lifted with the cup
    env.step(m.action(np.zeros(3), False))
    assert env.suction.attached is None
    for _ in range(20):
        env.step(m.action(np.zeros(3), False))
    assert m.bottom(name) < 0.005  # dropped back onto the table


def test_action_space_is_seven_dimensional(make_task_env):
    env = make_task_env("Push")
    assert env.action_space.shape == (7,)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)


def test_gym_ids_are_registered():
    import gymnasium as gym

    for task in envs.TASKS:
        assert envs.ENV_ID.format(task) in gym.registry


def test_levels_match_paper_section_5_1():
    assert sorted(envs.resolve_tasks("L0")) == sorted(["PlaceNextTo", "PlaceOnTop", "Topple", "Push"])
    assert sorted(envs.resolve_tasks("L1")) == sorted(["SingleStack", "StackTopple", "PushToTarget"])
    assert sorted(envs.resolve_tasks("held_out")) == sorted(["Pick", "ReverseStack", "NovelNoun"])
    assert envs.resolve_tasks("swap") == ["Swap"]
    assert len(envs.resolve_tasks("L0+L1")) == 7
    assert envs.resolve_tasks("Push,Topple,Push") == ["Push", "Topple"]
    assert len(envs.resolve_tasks("all")) == 11


@pytest.mark.parametrize("bad", ["L3", "PlaceOnTopp", "", "L0+Nope"])
def test_unknown_task_names_give_clear_errors(bad):
    with pytest.raises(envs.UnknownTaskError) as e:
        envs.resolve_tasks(bad)
    assert "task" in str(e.value)
    with pytest.raises(envs.UnknownTaskError):
        envs.make_env("Stack")


def _run_python(code: str, **env_vars) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **env_vars}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_missing_vulkan_driver_says_how_to_install(tmp_path):
    code = "import envs\ntry:\n    envs.make_env('Push')\nexcept envs.VulkanDriverMissing as e:\n    print('MSG', e)\n"
    r = _run_python(code, VK_DRIVER_FILES=str(tmp_path / "missing_icd.json"))
    assert "MSG" in r.stdout, r.stderr[-2000:]
    assert "install_vulkan.sh" in r.stdout and "mesa-vulkan-drivers" in r.stdout
    broken = tmp_path / "broken_icd.json"
    broken.write_text('{"file_format_version": "1.0.0", "ICD": {"library_path": "/nonexistent/libvk.so"}}')
    r = _run_python(code, VK_DRIVER_FILES=str(broken))
    assert "MSG" in r.stdout, r.stderr[-2000:]
    assert "install_vulkan.sh" in r.stdout


def test_without_the_wrist_camera_the_episode_and_the_base_image_are_the_same():
    """wrist_camera=False (policies that read no wrist image) drops wrist_rgb and changes nothing else."""
    from policies.base import Policy
    from policies.oracle_only import OracleOnly

    runs = {}
    for wrist in (True, False):
        env = envs.make_env("Push", image_size=32, wrist_camera=wrist)
        obs, _ = env.reset(seed=3)
        rng = np.random.default_rng(0)
        frames = [observation_arrays(obs)]
        for _ in range(6):
            obs, *_ = env.step(rng.uniform(-1, 1, 7).astype(np.float32))
            frames.append(observation_arrays(obs))
        env.close()
        runs[wrist] = frames
    assert all("wrist_rgb" in f for f in runs[True]) and not any("wrist_rgb" in f for f in runs[False])
    for with_wrist, without in zip(runs[True], runs[False]):
        assert set(with_wrist) - set(without) == {"wrist_rgb"}
        for key, value in without.items():
            np.testing.assert_array_equal(value, with_wrist[key])
    assert runs[True][-1]["base_rgb"].any()  # an image was rendered, not zeros
    assert Policy.reads_wrist and not OracleOnly.reads_wrist
