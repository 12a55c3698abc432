"""Code labels on hand-written traces: key-step/commented pattern, memory, ExtractMemoryInfo."""

from __future__ import annotations

import pytest

from datamodules.labels import (
    DEFAULT_EMPTY_MEMORY_INFO,
    commented,
    extract_memory_info,
    is_key_step,
    keystep_recall,
    memories,
    step_labels,
    uncomment,
)

PICK = "pick(get_actor('red cube'))"
MOVE = "move3d(get_actor('red cube'))"
PLACE = "place(get_actor('red cube'), get_actor('blue cube'))"
DONE = "done()"


def _trace(calls: list[tuple[str, int]]) -> tuple[list[str], list[bool]]:
    """Per-step (line, key flag) from (line, number of steps the call runs)."""
    lines, keys = [], []
    for line, n in calls:
        for i in range(n):
            lines.append(line)
            keys.append(i == 0)
    return lines, keys


# ---------------------------------------------------------------------------- key-steps
def test_step_labels_key_step_then_commented():
    lines, keys = _trace([(MOVE, 3), (PICK, 2), (DONE, 1)])
    labels = step_labels(lines, keys)
    assert labels == [
        MOVE, "# " + MOVE, "# " + MOVE,
        PICK, "# " + PICK,
        DONE,
    ]
    assert [is_key_step(x) for x in labels] == keys


def test_step_labels_repeated_call_gets_new_key_step():
    # The same line run twice in a row is two calls: each starts with a key-step.
    labels = step_labels([MOVE, MOVE, MOVE, MOVE], [True, False, True, False])
    assert labels == [MOVE, commented(MOVE), MOVE, commented(MOVE)]


def test_commented_and_uncomment_round_trip():
    assert commented(PICK) == "# " + PICK
    assert uncomment(commented(PICK)) == PICK
    assert uncomment(PICK) == PICK
    assert uncomment("#" + PICK) == PICK


@pytest.mark.parametrize(
    "label, expected",
    [
        (PICK, True),
        ("pose_dict['free'] = free_space(get_actor('red cube'))", True),
        ("  " + PICK, True),
        ("# " + PICK, False),
        ("#" + PICK, False),
        ("   # " + PICK, False),
        ("", False),
        ("   ", False),
        ("\n", False),
    ],
    ids=["plain", "assignment", "indented", "commented", "commented-no-space", "indented-comment",
         "empty", "spaces", "newline"],
)
def test_is_key_step(label, expected):
    assert is_key_step(label) is expected


# ---------------------------------------------------------------------------- memory
def test_memories_per_step():
    lines, keys = _trace([(MOVE, 2), (PICK, 3), (MOVE, 1), (PLACE, 2)])
    labels = step_labels(lines, keys)
    mem = memories(labels)
    assert len(mem) == len(labels)
    assert mem == [
        [],                      # step 0: MOVE key-step itself is not in its own memory
        [MOVE],                  # step 1: commented MOVE
        [MOVE],                  # step 2: PICK key-step
        [MOVE, PICK],            # steps 3, 4: commented PICK add nothing
        [MOVE, PICK],
        [MOVE, PICK],            # step 5: second MOVE key-step
        [MOVE, PICK, MOVE],      # step 6: PLACE key-step
        [MOVE, PICK, MOVE, PLACE],
    ]


def test_memories_are_independent_lists():
    mem = memories([MOVE, PICK, DONE])
    mem[1].append("x")
    assert mem[2] == [MOVE, PICK]
    assert mem[0] == []


def test_memories_ignore_blank_labels():
    assert memories([MOVE, "", PICK, "  ", DONE]) == [[], [MOVE], [MOVE], [MOVE, PICK], [MOVE, PICK]]


def test_memories_empty_trace():
    assert memories([]) == []


# ---------------------------------------------------------------------------- ExtractMemoryInfo
SWAP_ASSIGNMENTS = [
    "pose_dict['red cube'] = get_pose(get_actor('red cube'))",
    "pose_dict['blue cube'] = get_pose(get_actor('blue cube'))",
    "pose_dict['free'] = free_space(get_actor('red cube'))",
]


def test_extract_memory_info_swap_like_trace():
    calls = [(a, 1) for a in SWAP_ASSIGNMENTS] + [
        (MOVE, 3),
        (PICK, 2),
        ("move3d(pose_dict['free'])", 3),
        ("place(get_actor('red cube'), pose_dict['free'])", 2),
        ("move3d(get_actor('blue cube'))", 2),
        ("pick(get_actor('blue cube'))", 2),
        ("place(get_actor('blue cube'), pose_dict['red cube'])", 2),
        (DONE, 1),
    ]
    lines, keys = _trace(calls)
    mem = memories(step_labels(lines, keys))
    expected = "\n".join(SWAP_ASSIGNMENTS)
    assert extract_memory_info(mem[-1]) == expected
    # Before any assignment ran the info is empty; it grows one line per assignment step.
    assert extract_memory_info(mem[0]) == DEFAULT_EMPTY_MEMORY_INFO
    assert extract_memory_info(mem[1]) == SWAP_ASSIGNMENTS[0]
    assert extract_memory_info(mem[2]) == "\n".join(SWAP_ASSIGNMENTS[:2])
    assert extract_memory_info(mem[3]) == expected


def test_extract_memory_info_keeps_order():
    memory = [SWAP_ASSIGNMENTS[2], MOVE, SWAP_ASSIGNMENTS[0], PICK, SWAP_ASSIGNMENTS[1]]
    assert extract_memory_info(memory).split("\n") == [SWAP_ASSIGNMENTS[2], SWAP_ASSIGNMENTS[0],
                                                       SWAP_ASSIGNMENTS[1]]


def test_extract_memory_info_place_next_to_like_trace():
    assign = ("pose_dict['target'] = free_space_next_to(get_actor('red cube'), "
              "get_actor('blue cube'), direction='left')")
    lines, keys = _trace([(assign, 1), (MOVE, 2), (PICK, 2), ("move3d(pose_dict['target'])", 2),
                          ("place(get_actor('red cube'), pose_dict['target'])", 2), (DONE, 1)])
    mem = memories(step_labels(lines, keys))
    assert extract_memory_info(mem[0]) == DEFAULT_EMPTY_MEMORY_INFO
    for m in mem[1:]:
        assert extract_memory_info(m) == assign


def test_extract_memory_info_none():
    memory = [MOVE, PICK, PLACE, DONE]
    assert extract_memory_info(memory) == DEFAULT_EMPTY_MEMORY_INFO
    assert extract_memory_info(memory, empty="<empty>") == "<empty>"
    assert extract_memory_info([]) == DEFAULT_EMPTY_MEMORY_INFO
    assert extract_memory_info([], empty="") == ""


def test_default_empty_value_is_a_nonempty_string():
    assert isinstance(DEFAULT_EMPTY_MEMORY_INFO, str) and DEFAULT_EMPTY_MEMORY_INFO


@pytest.mark.parametrize(
    "line",
    [
        "pose_dict['x'] == get_pose(get_actor('a'))",
        "pose_dict['x']==pose_dict['y']",
        "place(get_actor('a'), pose_dict['x'])",
        "move3d(pose_dict['x'])",
        "push(get_actor('a'), towards=pose_dict['x'])",
        "# pose_dict['x'] = get_pose(get_actor('a'))",
        "pose_dict['x']",
    ],
    ids=["eq-compare", "eq-compare-nospace", "place-read", "move-read", "kwarg-read", "commented",
         "bare-read"],
)
def test_extract_memory_info_ignores_non_assignments(line):
    assert extract_memory_info([line]) == DEFAULT_EMPTY_MEMORY_INFO
    real = "pose_dict['y'] = free_space(get_actor('a'))"
    assert extract_memory_info([line, real]) == real


@pytest.mark.parametrize(
    "line",
    [
        "pose_dict['x'] = get_pose(get_actor('a'))",
        "pose_dict[\"x\"]=free_space(get_actor('a'))",
        "pose_dict['red cube']  =  pose_dict['free']",
    ],
    ids=["spaced", "double-quoted-nospace", "copy"],
)
def test_extract_memory_info_counts_assignments(line):
    assert extract_memory_info([MOVE, line, PICK]) == line


def test_keystep_recall_counts_oracle_key_steps_emitted_nearby_with_the_same_text():
    oracle = step_labels(*_trace([(MOVE, 4), (PICK, 3), (PLACE, 3), (DONE, 1)]))  # key-steps at 0, 4, 7, 10
    assert keystep_recall(oracle, oracle) == (4, 4)
    late = [commented(MOVE)] * 11
    late[3], late[9], late[10] = MOVE, PICK, DONE  # MOVE 3 late: found; PICK 5 late: missed; no PLACE
    assert keystep_recall(late, oracle, window=3) == (2, 4)
    assert keystep_recall(late, oracle, window=5) == (3, 4)
    wrong = list(oracle)
    wrong[7] = "place(get_actor('red cube'), get_actor('green cube'))"  # another object: not the oracle's line
    assert keystep_recall(wrong, oracle) == (3, 4)
    twice = [commented(MOVE)] * 11
    twice[0] = MOVE  # one emitted key-step cannot answer two oracle key-steps of the same text
    assert keystep_recall(twice, [MOVE, MOVE] + [commented(MOVE)] * 9) == (1, 2)
