"""Policy compositions: chunk regeneration (scripted VLM outputs + a counting DP), VLM+Oracle
failures through the real env and interpreter, DP+Oracle line tracking, OracleOnly."""

import os

import numpy as np
import pytest

from configs.errors import ConfigError
from datamodules.labels import commented
from envs.oracle import run_oracle
from policies.base import PolicyFailure
from policies.dp_oracle import DPOracle, numeric_line
from policies.evaluator import evaluate, run_episode
from policies.flat_dp import FlatDP
from policies.oracle_only import OracleOnly
from policies.spec import PolicySpec, PolicySpecError, build_policy
from policies.vlm_dp import VLMDP
from policies.vlm_oracle import VLMOracle
from policies.vlm_planner import PlanStep

OBS = {"base_rgb": np.zeros((8, 8, 3), np.uint8)}


class ScriptedPlanner:
    """VLM stand-in: returns scripted lines; the memory follows the planner's rule (append
    key-steps); ``cache_info`` is ExtractMemoryInfo of the memory."""

    def __init__(self, lines):
        self.lines = list(lines)

    def reset(self, prompt, objects=None):
        self.t, self.memory, self.prompt = 0, [], prompt

    @property
    def cache_info(self):
        from datamodules.labels import extract_memory_info

        return extract_memory_info(self.memory)

    def _next(self, image, require_key_step=False):
        line = self.lines[min(self.t, len(self.lines) - 1)]
        self.t += 1
        key = not line.startswith("#")
        if key:
            self.memory.append(line)
        return PlanStep(line=line, key_step=key, new_key_step=key, error=None, tokens=3, early_stopped=False)

    step = _next
    next_key_step = _next

    def check_context(self, image, request=False):
        pass  # a script has no context window


class CountingDP:
    """DP stand-in: chunk k holds actions [k, i, 0, ...] (i = index in the chunk); logs the calls."""

    def __init__(self, horizon=8, n_action_steps=4):
        self.horizon, self.n_action_steps = horizon, n_action_steps
        self.calls = []

    def reset(self):
        self.calls.clear()

    def predict_action_chunk(self, observation, instruction, cache_info):
        k = len(self.calls)
        self.calls.append((instruction, cache_info))
        chunk = np.zeros((self.horizon, 7), np.float32)
        chunk[:, 0] = k
        chunk[:, 1] = np.arange(self.horizon)
        return chunk


def script(key_steps, T):
    """T VLM outputs with key-steps (plain lines) at ``key_steps`` and commented lines between."""
    out, current = [], None
    for t in range(T):
        if t in key_steps:
            current = f"move3d(get_actor('cube {t}'))"
            out.append(current)
        else:
            out.append(commented(current))
    return out


def rollout(policy, T):
    policy.reset("Task", "Do it.")
    return [tuple(int(v) for v in policy.act(OBS)[:2]) for _ in range(T)]


def test_regeneration_drops_the_queued_chunk_exactly_at_new_key_steps():
    lines = script({0, 5, 6, 11}, 14)
    lines[9] = lines[6]  # the same key-step line again, plain: a key-step, so it regenerates too
    dp = CountingDP(horizon=8, n_action_steps=4)
    policy = VLMDP(ScriptedPlanner(lines), dp, regenerate_on_keystep=True)
    got = rollout(policy, 14)
    # (chunk, index in chunk) per step: chunks start at 0, 4 (queue empty), 5 (key), 6 (key),
    # 9 (the repeated key-step line) and 11 (key)
    expected = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (4, 0), (4, 1),
                (5, 0), (5, 1), (5, 2)]
    assert got == expected
    assert policy.dropped_chunks == 4  # at t = 5, 6, 9, 11; at t = 0 the queue was empty
    assert policy.dropped_actions == 3 + 3 + 1 + 2
    # the DP is conditioned on the instruction of the step that asked for the chunk
    assert [c[0] for c in dp.calls] == [lines[t] for t in (0, 4, 5, 6, 9, 11)]


class HoldingDP(CountingDP):
    """DP stand-in whose every second chunk ends in holds (its line ends within the chunk)."""

    def predict_action_chunk(self, observation, instruction, cache_info):
        chunk = super().predict_action_chunk(observation, instruction, cache_info)
        chunk[:, :3] = 0.3
        if len(self.calls) % 2 == 1:  # chunks 0, 2, ...: the line ends after the executed part
            chunk[self.n_action_steps:, :3] = 0.0
        return chunk


class EveryChunkHolds(CountingDP):
    """DP stand-in whose every chunk ends its line (holds) after the executed part."""

    def predict_action_chunk(self, observation, instruction, cache_info):
        chunk = super().predict_action_chunk(observation, instruction, cache_info)
        chunk[:, :3] = 0.3
        chunk[self.n_action_steps:, :3] = 0.0
        return chunk


class LoggingPlanner(ScriptedPlanner):
    def reset(self, prompt, objects=None):
        super().reset(prompt, objects)
        self.log = []

    def step(self, image):
        self.log.append("step")
        return self._next(image)

    def next_key_step(self, image, require_key_step=False):
        self.log.append("key")
        return self._next(image)


@pytest.mark.parametrize("on_hold", [True, False])
def test_vlm_is_asked_for_the_next_key_step_when_the_dp_ends_its_line(on_hold):
    from policies.vlm_dp import line_ends_in_chunk

    chunk = np.full((8, 7), 0.3, np.float32)
    assert not line_ends_in_chunk(chunk, 4)
    chunk[4:, :3] = 0.01
    assert line_ends_in_chunk(chunk, 4) and not line_ends_in_chunk(chunk, 3)
    assert line_ends_in_chunk(np.zeros((8, 7)), 8)  # all executed: the last quarter decides
    planner = LoggingPlanner(script({0}, 12))
    policy = VLMDP(planner, HoldingDP(horizon=8, n_action_steps=4), keystep_on_hold=on_hold)
    rollout(policy, 10)
    # chunk 0 (t = 0..3) ends its line: at t = 4, once it is executed, the VLM gets the key-step
    # request; chunk 1 (t = 4..7) does not end it: plain queries until chunk 2 at t = 8
    expected = ["step"] * 4 + ["key"] + ["step"] * 5 if on_hold else ["step"] * 10
    assert planner.log == expected
    assert policy.stats()["keystep_requests"] == expected.count("key")


def test_without_per_step_queries_the_dp_paces_the_plan():
    """query_every_step=False: the VLM is asked (with the key-step request) only at the start
    and when the DP's line is over; in between the DP gets the running line commented out."""
    lines = [f"move3d(get_actor('cube {i}'))" for i in range(6)]
    planner = LoggingPlanner(lines)
    dp = HoldingDP(horizon=8, n_action_steps=4)
    policy = VLMDP(planner, dp, query_every_step=False)
    rollout(policy, 10)
    # chunk 0 (t = 0..3) ends its line -> key request at t = 4; chunk 1 (t = 4..7) does not end
    # it, so t = 5..7 run without the VLM; chunk 2 at t = 8 (the queue is empty, same line)
    assert planner.log == ["key", "key"]
    assert [c[0] for c in dp.calls] == [lines[0], lines[1], commented(lines[1])]
    assert policy.stats()["keystep_requests"] == 2 and policy.key_steps == 2

    class MovingDP(CountingDP):  # never holds: its line never ends
        def predict_action_chunk(self, observation, instruction, cache_info):
            chunk = super().predict_action_chunk(observation, instruction, cache_info)
            chunk[:, :3] = 0.3
            return chunk

    planner = LoggingPlanner(lines)
    policy = VLMDP(planner, MovingDP(horizon=8, n_action_steps=4), query_every_step=False, max_line_steps=5)
    rollout(policy, 12)
    assert planner.log == ["key", "key", "key"]  # at t = 0, 5 and 10: max_line_steps reached


class StopsLaterDP(CountingDP):
    """DP stand-in that moves a little and then holds in its first two chunks, and holds
    throughout from its third on (it has stopped)."""

    def predict_action_chunk(self, observation, instruction, cache_info):
        chunk = super().predict_action_chunk(observation, instruction, cache_info)
        chunk[:, :3] = 0.0
        if len(self.calls) <= 2:
            chunk[:2, :3] = 0.3
        return chunk


def test_line_end_check_chunk_waits_until_the_dp_has_stopped():
    """``tail`` ends the line when the part after the executed actions holds; ``chunk`` only when
    the whole chunk holds, so a DP that moves a little and then holds keeps its line."""
    from policies.vlm_dp import line_ends_in_chunk

    chunk = np.zeros((8, 7), np.float32)
    chunk[:2, :3] = 0.3
    assert line_ends_in_chunk(chunk, 4) and line_ends_in_chunk(chunk, 4, "tail")
    assert not line_ends_in_chunk(chunk, 4, "chunk") and line_ends_in_chunk(np.zeros((8, 7)), 4, "chunk")
    lines = [f"move3d(get_actor('cube {i}'))" for i in range(6)]
    tail = VLMDP(LoggingPlanner(lines), StopsLaterDP(horizon=8, n_action_steps=4), query_every_step=False)
    rollout(tail, 12)
    assert tail.planner.log == ["key"] * 3  # every chunk ends its line: requests at t = 0, 4 and 8
    stopped = VLMDP(LoggingPlanner(lines), StopsLaterDP(horizon=8, n_action_steps=4), query_every_step=False,
                    line_end_check="chunk")
    rollout(stopped, 12)
    # chunks at t = 0 and 4 move: the line runs on; the chunk at t = 8 holds throughout: at t = 12 the VLM is asked
    assert stopped.planner.log == ["key"] and stopped.act(OBS) is not None and stopped.planner.log == ["key", "key"]
    with pytest.raises(ConfigError, match="line_end_check"):
        VLMDP(LoggingPlanner(lines), CountingDP(horizon=8), line_end_check="never")
    with pytest.raises(ConfigError, match="max_line_steps"):
        VLMDP(LoggingPlanner(lines), CountingDP(horizon=8), max_line_steps=0)
    with pytest.raises(PolicySpecError, match="line_end_check"):  # a vlm_dp / dp_oracle option only
        PolicySpec("flat_dp", dp=".", options={"line_end_check": "chunk"}).validate()


def test_hold_threshold_lets_a_hovering_dp_end_its_line():
    """A chunk that jitters by 0.08 action units (4 mm per step) holds under ``hold_threshold=0.1``
    but not under the default 0.05; bad thresholds are refused."""
    from policies.vlm_dp import line_ends_in_chunk

    hover = np.zeros((8, 7), np.float32)
    hover[::3, :3] = [0.08, -0.08, 0.08]
    assert not line_ends_in_chunk(hover, 4, "chunk") and line_ends_in_chunk(hover, 4, "chunk", 0.1)

    class HoveringDP(CountingDP):
        def predict_action_chunk(self, observation, instruction, cache_info):
            chunk = super().predict_action_chunk(observation, instruction, cache_info)
            chunk[:, :3] = hover[:, :3]
            return chunk

    lines = [f"move3d(get_actor('cube {i}'))" for i in range(6)]
    strict = VLMDP(LoggingPlanner(lines), HoveringDP(horizon=8, n_action_steps=4), query_every_step=False,
                   line_end_check="chunk", max_line_steps=40)
    loose = VLMDP(LoggingPlanner(lines), HoveringDP(horizon=8, n_action_steps=4), query_every_step=False,
                  line_end_check="chunk", max_line_steps=40, hold_threshold=0.1)
    rollout(strict, 12), rollout(loose, 12)
    assert strict.planner.log == ["key"] and loose.planner.log == ["key"] * 3
    for bad in (0, -0.1, 2):
        with pytest.raises(ConfigError, match="hold_threshold"):
            VLMDP(LoggingPlanner(lines), CountingDP(horizon=8), hold_threshold=bad)
    with pytest.raises(PolicySpecError, match="hold_threshold"):  # an option of the policies with a DP only
        PolicySpec("vlm_oracle", vlm=".", options={"hold_threshold": 0.1}).validate()


def test_the_dp_checkpoints_execution_settings_are_the_defaults_and_options_override_them():
    lines = ["move3d(get_actor('a'))", "done()"]
    plain = VLMDP(LoggingPlanner(lines), CountingDP(horizon=8))
    assert (plain.line_end_check, plain.max_line_steps, plain.snap_holds) == ("tail", 100, False)
    dp = CountingDP(horizon=8)
    dp.execution = {"line_end_check": "chunk", "max_line_steps": 40, "snap_holds": True}
    own = VLMDP(LoggingPlanner(lines), dp)
    assert (own.line_end_check, own.max_line_steps, own.snap_holds) == ("chunk", 40, True)
    told = VLMDP(LoggingPlanner(lines), dp, line_end_check="tail", max_line_steps=7, snap_holds=False)
    assert (told.line_end_check, told.max_line_steps, told.snap_holds) == ("tail", 7, False)
    assert FlatDP(dp).snap_holds and not FlatDP(dp, snap_holds=False).snap_holds
    # DP+Oracle's dp pace ends a line after the checkpoint's max_line_steps too
    assert DPOracle(CountingDP(horizon=8), pace="dp").max_line_steps == 100
    assert DPOracle(dp, pace="dp").max_line_steps == 40 and DPOracle(dp, max_line_steps=7).max_line_steps == 7
    with pytest.raises(ConfigError, match="max_line_steps"):
        DPOracle(dp, max_line_steps=0)
    with pytest.raises(ConfigError, match="snap_holds"):
        FlatDP(dp, snap_holds="yes")


def test_snap_holds_executes_jitter_as_exact_holds():
    """With ``snap_holds`` an executed action below the hold threshold on every axis loses its
    TCP translation (orientation and suction kept); a real move is executed as predicted."""
    from policies.vlm_dp import snap_to_holds

    chunk = np.zeros((8, 7), np.float32)
    chunk[0, :3] = [0.3, 0.0, 0.0]          # a move
    chunk[1, :3] = [0.02, -0.03, 0.04]      # jitter
    chunk[2, :3] = [0.02, 0.0, 0.06]        # one axis above 0.05: a (slow) move
    chunk[:, 3:6], chunk[:, 6] = 0.01, 1.0
    snapped = snap_to_holds(chunk)
    assert np.array_equal(snapped[1, :3], np.zeros(3)) and np.array_equal(snapped[[0, 2], :3], chunk[[0, 2], :3])
    assert np.array_equal(snapped[:, 3:], chunk[:, 3:]) and chunk[1, 0] == np.float32(0.02)  # the input is not changed

    class JitteringDP(CountingDP):
        def predict_action_chunk(self, observation, instruction, cache_info):
            out = super().predict_action_chunk(observation, instruction, cache_info)
            out[:, :3] = chunk[:, :3]
            return out

    lines = ["move3d(get_actor('a'))", "done()"]
    executed = {snap: [VLMDP(LoggingPlanner(lines), JitteringDP(horizon=8, n_action_steps=4), snap_holds=snap,
                             query_every_step=False)]
                for snap in (False, True)}
    for snap, (policy,) in executed.items():
        policy.reset("Task", "Do it.")
        executed[snap] = np.stack([policy.act(OBS) for _ in range(4)])
    assert executed[False][1, 0] == pytest.approx(0.02) and np.all(executed[True][1, :3] == 0)
    assert np.allclose(executed[True][[0, 2], :3], executed[False][[0, 2], :3])


def test_confirm_line_end_gives_the_dp_its_ended_motion_line_again_before_the_vlm_is_asked():
    lines = ["pose_dict['a'] = get_pose(get_actor('a'))", "push(get_actor('a'), pose_dict['a'])", "done()"]
    planner = LoggingPlanner(lines)

    dp = EveryChunkHolds(horizon=8, n_action_steps=4)
    policy = VLMDP(planner, dp, query_every_step=False, confirm_line_end=1)
    rollout(policy, 20)
    # the pose_dict line (t = 0..3) is not repeated; push (t = 4..7) is given once more as a
    # key-step (t = 8..11) with its own key-step's cache info, then the VLM is asked: done()
    # (t = 12..15) is not repeated either
    assert planner.log == ["key", "key", "key", "key"]
    assert [c[0] for c in dp.calls] == [lines[0], lines[1], lines[1], lines[2], lines[2]]
    assert dp.calls[2][1] == dp.calls[1][1]
    assert policy.stats()["confirmed_lines"] == 1 and policy.key_steps == 5  # 4 from the VLM, 1 repeat
    planner = LoggingPlanner(lines)
    off = VLMDP(planner, EveryChunkHolds(horizon=8, n_action_steps=4), query_every_step=False)
    rollout(off, 12)
    assert planner.log == ["key", "key", "key"] and off.stats()["confirmed_lines"] == 0
    with pytest.raises(ConfigError, match="confirm_line_end"):
        VLMDP(planner, dp, confirm_line_end=-1)


def test_an_unfinished_answer_gives_the_dp_its_running_line_again():
    """A key-step request answered "# <running line>" (the VLM: not finished): the DP gets the
    plain line again as a key-step, with its first key-step's cache info; the memory does not grow."""
    lines = ["pose_dict['a'] = get_pose(get_actor('a'))", "push(get_actor('a'), pose_dict['a'])",
             "# push(get_actor('a'), pose_dict['a'])", "# move3d(get_actor('b'))", "done()"]

    planner = LoggingPlanner(lines)
    dp = EveryChunkHolds(horizon=8, n_action_steps=4)
    policy = VLMDP(planner, dp, query_every_step=False, stop_on_done=False)
    rollout(policy, 20)
    # a request at t = 0, 4 (push), 8 ("# push": unfinished -> push again), 12 ("# move3d ...":
    # not the running line -> the DP gets it as it is), 16 (done())
    assert planner.log == ["key"] * 5
    assert [c[0] for c in dp.calls] == [lines[0], lines[1], lines[1], lines[3], lines[4]]
    assert dp.calls[2][1] == dp.calls[1][1]
    assert policy.stats()["reissued_lines"] == 1 and policy.key_steps == 4
    assert planner.memory == [lines[0], lines[1], lines[4]]
    plain = VLMDP(LoggingPlanner(["move3d(get_actor('a'))"] + ["# move3d(get_actor('a'))"] * 3),
                  CountingDP(horizon=8, n_action_steps=4))  # plain steps never re-issue
    rollout(plain, 8)
    assert plain.stats()["reissued_lines"] == 0 and plain.key_steps == 1


class StubbornPlanner(ScriptedPlanner):
    """Answers every key-step request after the first with "# <that line>" (not finished) unless
    the request requires a key-step; then it writes ``done()``. Logs each request's requirement."""

    def reset(self, prompt, objects=None):
        super().reset(prompt, objects)
        self.required = []

    def next_key_step(self, image, require_key_step=False):
        self.required.append(require_key_step)
        line = "done()" if require_key_step else self.lines[0] if not self.memory else commented(self.lines[0])
        key = not line.startswith("#")
        if key:
            self.memory.append(line)
        return PlanStep(line=line, key_step=key, new_key_step=key, error=None, tokens=3, early_stopped=False)


def test_after_max_line_steps_the_vlm_must_name_a_new_line():
    """A DP that holds at once on its re-issued line and a VLM that keeps answering "not finished"
    would loop to the step cap: after max_line_steps steps of one line the request requires a key-step."""
    planner = StubbornPlanner(["move3d(get_actor('a'))"])
    policy = VLMDP(planner, EveryChunkHolds(horizon=8, n_action_steps=4), query_every_step=False, max_line_steps=12)
    rollout(policy, 13)
    # requests at t = 0 (the line), 4 and 8 (not finished: re-issued), 12 (12 steps of the line: required)
    assert planner.required == [False, False, False, True]
    assert policy.stats()["reissued_lines"] == 2 and policy.stats()["forced_key_steps"] == 1
    assert policy.finished and policy.instruction == "done()"
    longer = VLMDP(StubbornPlanner(["move3d(get_actor('a'))"]), EveryChunkHolds(horizon=8, n_action_steps=4),
                   query_every_step=False, max_line_steps=100)
    rollout(longer, 40)
    assert not any(longer.planner.required) and longer.stats()["reissued_lines"] == 9 and not longer.finished


def test_stop_on_done_ends_the_policy_when_the_vlm_writes_done():
    lines = ["move3d(get_actor('a'))", "# move3d(get_actor('a'))", "done()", "# done()", "move3d(get_actor('b'))"]
    stop = VLMDP(ScriptedPlanner(lines), CountingDP(horizon=8, n_action_steps=4))  # the default
    rollout(stop, 2)
    assert not stop.finished
    stop.act(OBS)  # done(): its step's action is still given, then the policy has finished
    assert stop.finished and stop.instruction == "done()"
    on = VLMDP(ScriptedPlanner(lines), CountingDP(horizon=8, n_action_steps=4), stop_on_done=False)  # the DP holds on
    rollout(on, 5)
    assert not on.finished and on.instruction == lines[4]
    with pytest.raises(PolicySpecError, match="stop_on_done"):  # a vlm_dp option only
        PolicySpec("vlm_oracle", vlm=".", options={"stop_on_done": True}).validate()


def test_without_regeneration_chunks_run_blindly_for_n_action_steps():
    dp = CountingDP(horizon=8, n_action_steps=3)
    policy = VLMDP(ScriptedPlanner(script({0, 5, 6, 11}, 14)), dp, regenerate_on_keystep=False)
    got = rollout(policy, 14)
    assert got == [(t // 3, t % 3) for t in range(14)]
    assert policy.dropped_chunks == 0 and policy.key_steps == 4


def test_n_action_steps_override_and_bounds():
    dp = CountingDP(horizon=8, n_action_steps=4)
    policy = VLMDP(ScriptedPlanner(script({0}, 20)), dp, n_action_steps=8)
    assert rollout(policy, 20) == [(t // 8, t % 8) for t in range(20)]
    with pytest.raises(ValueError, match="n_action_steps"):
        VLMDP(ScriptedPlanner([]), CountingDP(horizon=8), n_action_steps=9)


def test_dp_gets_the_cache_info_of_the_memory_before_the_step():
    lines = ["pose_dict['target'] = free_space(get_actor('red cube'))", "move3d(pose_dict['target'])",
             "# move3d(pose_dict['target'])"]
    dp = CountingDP(horizon=4, n_action_steps=1)
    rollout(VLMDP(ScriptedPlanner(lines), dp), 3)
    assert [c[1] for c in dp.calls] == ["None", lines[0], lines[0]]  # M_t excludes step t's own line


def test_flat_dp_is_conditioned_on_the_prompt_and_never_regenerates_early():
    dp = CountingDP(horizon=6, n_action_steps=5)
    policy = FlatDP(dp)
    assert rollout(policy, 11) == [(t // 5, t % 5) for t in range(11)]
    assert dp.calls == [("Do it.", "None")] * 3


def test_non_finite_dp_actions_end_the_episode_as_a_failure():
    class NanDP(CountingDP):
        def predict_action_chunk(self, *a):
            return np.full((self.horizon, 7), np.nan, np.float32)

    policy = FlatDP(NanDP())
    policy.reset("Task", "Do it.")
    with pytest.raises(PolicyFailure, match="invalid action"):
        policy.act(OBS)


@pytest.mark.parametrize("bad_line, reason, words", [
    ("move3d(get_actor('{obj}')", "code error", "not parseable"),
    ("teleport(get_actor('{obj}'))", "code error", "is not a skill"),
    ("pick(get_actor('golden dragon'))", "unknown object", "in the scene"),
    ("__import__('os').system('touch {marker}')", "code error", "must call a skill"),
    ("# move3d(get_actor('{obj}'))", "code error", "commented-out"),
])
def test_vlm_oracle_turns_bad_code_into_a_recorded_failure(make_task_env, tmp_path, bad_line, reason, words):
    env = make_task_env("PlaceOnTop", 32)
    env.reset(seed=3)
    obj = env.layout.params["obj"]
    marker = tmp_path / "executed"
    bad = bad_line.format(obj=obj, marker=marker)
    # one good key-step first: the bad line comes after real steps in the real scene
    policy = VLMOracle(ScriptedPlanner([f"move3d(get_actor('{obj}'))", bad]))
    result, video = run_episode(env, policy, seed=3, record_video=True)
    assert not result.success
    assert result.failure == reason, result
    assert words in result.detail and bad in result.detail
    assert result.steps > 5  # the good move3d ran to its termination first
    assert result.stats["vlm_queries"] == 2
    assert not marker.exists()
    assert video.captions[-1].startswith(f"FAIL: {reason}")


def test_vlm_oracle_with_a_correct_plan_solves_the_task(make_task_env):
    env = make_task_env("PlaceNextTo", 32)
    trace = run_oracle(env, seed=100001)
    assert trace.success
    policy = VLMOracle(ScriptedPlanner(trace.key_lines))
    result, _ = run_episode(env, policy, seed=100001, stop_on_success=False)
    assert result.success and result.steps == len(trace), result
    assert policy.finished  # done() ended the episode


def test_oracle_only_reproduces_run_oracle(make_task_env):
    env = make_task_env("PlaceNextTo", 32)
    trace = run_oracle(env, seed=100002)
    policy = OracleOnly()
    policy.attach(env)
    result, _ = run_episode(env, policy, seed=100002, stop_on_success=False)
    assert result.success == trace.success and result.steps == len(trace)
    assert result.stats["code_lines"] == len(trace.key_lines)


def test_oracle_only_succeeds_through_the_evaluator():
    res = evaluate(PolicySpec("oracle"), ["PlaceOnTop", "Topple"], seeds=[100000, 100001], image_size=32,
                   video_episodes=1)
    for task in ("PlaceOnTop", "Topple"):
        r = res.per_task[task]
        assert r.n == 2 and r.success_rate == 1.0, r.failure_reasons
        assert 5 < r.mean_length < 250
    assert res.mean_success == 1.0
    assert [(v.task, v.seed) for v in res.videos] == [("PlaceOnTop", 100000), ("Topple", 100000)]
    video = res.videos[0]
    assert video.frames.shape[1:] == (32, 32, 3) and len(video.captions) == len(video.frames)
    assert "move3d(get_actor(" in video.captions[0] and video.captions[-1] == "SUCCESS"


class ReplayDP(CountingDP):
    """Replays recorded actions by the env's step counter: a perfect DP for one seed."""

    def __init__(self, env, actions, horizon=8, n_action_steps=8):
        super().__init__(horizon, n_action_steps)
        self.env, self.actions = env, np.array(actions)

    def predict_action_chunk(self, observation, instruction, cache_info):
        self.calls.append((instruction, cache_info))
        t = int(self.env.elapsed_steps[0])
        idx = np.minimum(np.arange(t, t + self.horizon), len(self.actions) - 1)
        return self.actions[idx]


def test_dp_oracle_tracks_the_oracle_lines_with_positions_inserted(make_task_env):
    env = make_task_env("Swap", 32)
    trace = run_oracle(env, seed=100000)
    assert trace.success
    dp = ReplayDP(env, trace.actions)
    policy = DPOracle(dp, regenerate_on_keystep=True, insert_positions=True, tracker_slack=1.0)
    policy.attach(env)
    result, video = run_episode(env, policy, seed=100000, record_video=True)
    assert result.success, result
    # the DP's actions were the oracle's, so the tracked lines change exactly where the oracle's did
    key_t = [t for t, s in enumerate(trace.steps) if s.key_step and t < result.steps]
    assert len(key_t) >= 14 and result.stats["key_steps"] == len(key_t)
    instructions = [c.lstrip().split(" ", 1)[1] for c in video.captions[:-1]]  # captions: "<t> <line>"
    assert [t for t, c in enumerate(instructions) if not c.startswith("#")] == key_t
    env.reset(seed=100000)
    p = env.layout.params
    start_a = env.object_pose(p["a"]).p
    first = instructions[0]
    assert first == f"pose_dict[{p['a']!r}] = ({start_a[0]:.3f}, {start_a[1]:.3f}, {start_a[2]:.3f})"
    assert "pose_dict" not in instructions[key_t[9]]  # move3d(pose_dict[a]) -> numbers
    assert instructions[key_t[9]].startswith("move3d((")
    # cache info: the numeric assignments among the key-steps *before* t (three at t = 0, 1, 2)
    assert key_t[:3] == [0, 1, 2]
    assert [c[1] for c in dp.calls[:3]] == ["None", instructions[0], instructions[0] + "\n" + instructions[1]]
    assert dp.calls[-1][1].count("pose_dict[") == 3


def test_dp_paced_oracle_gives_the_next_line_when_the_dp_holds(make_task_env):
    """pace='dp': the oracle's next line starts when the DP's chunk ends in holds, never when a
    skill's own test would end it; its query still runs on the scene (the goal is stored)."""
    env = make_task_env("Push", 32)
    dp = HoldingDP(horizon=8, n_action_steps=4)
    policy = DPOracle(dp, insert_positions=False, pace="dp")
    policy.attach(env)
    result, _ = run_episode(env, policy, seed=100000, max_steps=13)
    assert result.steps == 13
    goal, move, push = policy.memory[:3]
    assert goal.startswith("pose_dict['goal'] = offset_pose(") and move.startswith("move3d(")
    assert push.startswith("push(") and len(policy.memory) == 3
    # chunk 0 (t = 0..3) holds at its end -> move3d at t = 4; chunk 1 (t = 4..7) does not, so
    # chunk 2 (t = 8..11) gets the running line commented; it holds -> push at t = 12
    assert [c[0] for c in dp.calls] == [goal, move, commented(move), push]
    assert "goal" in policy.pose_dict() and policy.stats()["key_steps"] == 3
    with pytest.raises(ConfigError):
        DPOracle(dp, pace="skills")


class StillDP(CountingDP):
    """DP stand-in that never moves the arm (every action holds still, suction off)."""

    def predict_action_chunk(self, observation, instruction, cache_info):
        super().predict_action_chunk(observation, instruction, cache_info)
        chunk = np.zeros((self.horizon, 7), np.float32)
        chunk[:, 6] = -1.0
        return chunk


@pytest.mark.parametrize("reissue_after", [0, 5])
def test_tracker_reissues_a_line_the_dp_leaves_unfinished(make_task_env, reissue_after):
    """reissue_after=N: a line that the oracle's skill has not ended N steps after its key-step
    is given to the DP again as a key-step (plain, its chunk regenerated); the memory keeps one
    copy. A still DP never finishes ``move3d``."""
    env = make_task_env("Push", 32)
    dp = StillDP(horizon=8, n_action_steps=4)
    policy = DPOracle(dp, insert_positions=False, reissue_after=reissue_after)
    policy.attach(env)
    result, video = run_episode(env, policy, seed=100000, max_steps=20, record_video=True)
    instructions = [c.lstrip().split(" ", 1)[1] for c in video.captions[:-1]]
    goal, move = policy.memory
    assert instructions[0] == goal and instructions[1] == move  # the assignment holds one step
    plain = [t for t, c in enumerate(instructions) if c == move]
    if reissue_after:
        assert plain == [1, 6, 11, 16]  # key-step at t=1; after 5 steps unfinished, again
        assert policy.stats()["reissued_lines"] == 3
        assert [c[0] for c in dp.calls].count(move) == 4  # each reissue regenerates the chunk
    else:
        assert plain == [1] and policy.stats()["reissued_lines"] == 0
    with pytest.raises(ConfigError):
        DPOracle(dp, reissue_after=-1)


def test_tracker_slack_widens_skill_tolerances_and_caps(make_task_env):
    """Motion.slack: a servo 9 mm from its goal is done with slack 2 and still moving with 1;
    its step cap doubles. DPOracle's tracker uses slack 2 by default."""
    from envs.skills.controllers import Motion

    env = make_task_env("Push", 32)
    env.reset(seed=0)
    base = env.unwrapped
    tcp = Motion(base).tcp()
    goal = tcp + np.array([0.009, 0.0, 0.0])

    def run(slack):
        gen = Motion(base, slack).servo(lambda: goal, 0.025, False, 0.006, 60)
        try:
            next(gen)
            return "moving"
        except StopIteration as stop:
            return stop.value

    assert run(1.0) == "moving" and run(2.0) is True
    assert Motion(base, 2.0).cap(13) == 26
    policy = DPOracle(ReplayDP(env, []))
    policy.attach(base)
    policy.reset("Push", base.prompt())
    assert policy.tracker.executor.api.motion.slack == 2.0


def test_numeric_line():
    from envs.skills import Pose

    poses = {"red cube": Pose((0.1, -0.2, 0.0251)), "free": Pose((0.01, 0.02, 0.03))}
    assert numeric_line("place(get_actor('red cube'), pose_dict['free'])", poses) == \
        "place(get_actor('red cube'), (0.010, 0.020, 0.030))"
    assert numeric_line("pose_dict['red cube'] = get_pose(get_actor('red cube'))", poses) == \
        "pose_dict['red cube'] = (0.100, -0.200, 0.025)"
    assert numeric_line("move3d(pose_dict['gone'])", poses) == "move3d(pose_dict['gone'])"


def test_policy_spec_errors(tmp_path):
    with pytest.raises(PolicySpecError, match="unknown policy"):
        PolicySpec("teleport").validate()
    with pytest.raises(PolicySpecError, match="needs a DP"):
        PolicySpec("vlm_dp", vlm=str(tmp_path)).validate()
    with pytest.raises(PolicySpecError, match="does not exist"):
        PolicySpec("flat_dp", dp=os.path.join(tmp_path, "missing.ckpt")).validate()
    with pytest.raises(PolicySpecError, match="no option"):
        PolicySpec("oracle", options={"horizon": 4}).validate()
    assert isinstance(build_policy(PolicySpec("oracle")), OracleOnly)
