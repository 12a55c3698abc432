"""Oracle solvers, code traces and their replay through the safe interpreter (real simulator)."""

import numpy as np
import pytest

import envs
from envs.oracle import run_code, run_oracle
from envs.skills import Interpreter

FAST_TASKS = ["PlaceOnTop", "PlaceNextTo", "Push", "Topple", "Pick", "PushToTarget", "NovelNoun"]
LONG_TASKS = ["SingleStack", "StackTopple", "ReverseStack", "Swap"]


def _check_trace(ep):
    assert ep.success, ep.failure
    assert ep.steps[0].key_step
    assert ep.key_lines[-1] == "done()"
    # each key-step starts a call; the following steps run the same line
    for prev, cur in zip(ep.steps, ep.steps[1:]):
        if not cur.key_step:
            assert cur.line == prev.line
    assert len(ep.actions) == len(ep.steps)
    assert all(a.shape == (7,) and np.all(np.abs(a) <= 1) for a in ep.actions)
    parser = Interpreter(api=None)
    for line in ep.key_lines:
        parser.parse(line)  # every emitted line is valid API code


@pytest.mark.parametrize("task", FAST_TASKS)
def test_oracle_solves_a_fixed_seed(make_task_env, task):
    _check_trace(run_oracle(make_task_env(task), seed=1))


@pytest.mark.slow
@pytest.mark.parametrize("task", LONG_TASKS)
def test_oracle_solves_a_fixed_seed_long_tasks(make_task_env, task):
    _check_trace(run_oracle(make_task_env(task), seed=1))


def test_swap_remembers_start_poses_in_pose_dict(make_task_env):
    ep = run_oracle(make_task_env("Swap"), seed=2)
    assert ep.success, ep.failure
    lines = ep.key_lines
    assert lines[0].startswith("pose_dict[") and "get_pose(" in lines[0]
    # the stored poses are used again later, after other calls
    key = lines[0].split("'")[1]
    later = [i for i, line in enumerate(lines) if f"pose_dict['{key}']" in line and not line.startswith("pose_dict")]
    assert later and later[0] > 3


def test_place_next_to_stores_its_target_first(make_task_env):
    ep = run_oracle(make_task_env("PlaceNextTo"), seed=4)
    assert ep.success
    assert ep.key_lines[0].startswith("pose_dict['target'] = free_space_next_to(")
    assert any("pose_dict['target']" in line for line in ep.key_lines[2:])


def test_push_stores_its_goal_and_pushes_the_object_there(make_task_env):
    env = make_task_env("Push")
    ep = run_oracle(env, seed=5)
    assert ep.success, ep.failure
    direction = env.unwrapped.layout.params["direction"]
    assert ep.key_lines[0] == (f"pose_dict['goal'] = offset_pose(get_actor('{env.unwrapped.layout.params['obj']}'), "
                               f"direction='{direction}', distance=0.1)")
    assert ep.key_lines[2].endswith("towards=pose_dict['goal'])")
    start = np.array(env.unwrapped.layout.params["start"])
    goal = np.array(ep.pose_dict["goal"][:2])
    np.testing.assert_allclose(goal - start, envs.skills.DIRECTIONS[direction] * 0.1, atol=1e-3)
    final = env.unwrapped.object_poses()[0, :2]
    assert np.linalg.norm(final - goal) < 0.03  # the push ends at the stored goal


@pytest.mark.parametrize("line", ["pose_dict['g'] = offset_pose(get_actor('{o}'), direction='up', distance=0.1)",
                                  "pose_dict['g'] = offset_pose(get_actor('{o}'), direction='left', distance=0.5)",
                                  "push(get_actor('{o}'), towards='{o}')"])
def test_offset_pose_and_push_towards_refuse_bad_arguments(make_task_env, line):
    env = make_task_env("Push")
    env.reset(seed=0)
    ep = run_code(env, [line.format(o=env.unwrapped.layout.params["obj"])], seed=0)
    assert not ep.success and ep.failure


def test_replaying_the_code_trace_reproduces_the_episode(make_task_env):
    env = make_task_env("PlaceNextTo")
    ep = run_oracle(env, seed=6)
    assert ep.success
    replay = run_code(env, ep.key_lines, seed=6)
    assert replay.success
    assert replay.key_lines == ep.key_lines
    np.testing.assert_array_equal(np.array(replay.actions), np.array(ep.actions))


def test_replay_in_a_fresh_env_succeeds(make_task_env):
    ep = run_oracle(make_task_env("Swap"), seed=3)
    fresh = envs.make_env("Swap", image_size=64)
    try:
        assert run_code(fresh, ep.key_lines, seed=3).success
    finally:
        fresh.close()


def test_wrong_code_fails_with_a_reason_not_a_crash(make_task_env):
    env = make_task_env("PlaceOnTop")
    ep = run_code(env, ["move3d(get_actor('golden dragon'))"], seed=0)
    assert not ep.success and "golden dragon" in ep.failure
    ep = run_code(env, ["__import__('os').system('echo hacked')"], seed=0)
    assert not ep.success and ep.failure.startswith("code error")
    ep = run_code(env, ["place(get_actor(%r), pose_dict['nowhere'])" % env.layout.names[0]], seed=0)
    assert not ep.success and "nowhere" in ep.failure


def test_wrong_plan_does_not_solve_the_task(make_task_env):
    env = make_task_env("PlaceOnTop")
    env.reset(seed=5)
    p = env.layout.params
    wrong = [f"move3d(get_actor({p['target']!r}))", f"pick(get_actor({p['target']!r}))",
             f"move3d(get_actor({p['obj']!r}))", f"place(get_actor({p['target']!r}), get_actor({p['obj']!r}))",
             "done()"]
    ep = run_code(env, wrong, seed=5)
    assert not ep.success and ep.failure == "task not solved"


def test_step_cap_ends_an_episode(make_task_env):
    env = make_task_env("PlaceOnTop")
    ep = run_oracle(env, seed=0, max_steps=10)
    assert not ep.success and "step cap" in ep.failure and len(ep) == 10
