"""Code labels of the paper (section 4.1, 4.2, Appendix E.3).

* Per step, the code line of the running skill call: its first step (the key-step) carries
  the plain line, every later step of the same call the line commented out with ``# ``.
* Memory M_t: the key-step lines emitted before step t, in order.
* ExtractMemoryInfo (Algorithm 1): the memory lines that assign a ``pose_dict`` key, joined
  with newlines; no such line gives ``empty``.
"""

from __future__ import annotations

import re

COMMENT = "# "
POSE_DICT_ASSIGNMENT = re.compile(r"^\s*pose_dict\[[^\]]+\]\s*=(?!=)")
POSE_DICT_READ = re.compile(r"pose_dict\[(['\"])(.*?)\1\]")  # group 2: the key
DEFAULT_EMPTY_MEMORY_INFO = "None"  # the paper's symbol was lost; we use the literal "None"


def commented(line: str) -> str:
    return COMMENT + line


def pose_assignments(lines) -> dict[str, tuple[int, str]]:
    """Each ``pose_dict`` key that ``lines`` assign -> (index, stripped line) of its latest
    assignment, the one whose value executing the lines in order would leave; keys in the order
    of those assignments."""
    latest = {}
    for i, line in enumerate(lines):
        line = line.strip()
        key = POSE_DICT_READ.match(line)
        if key and POSE_DICT_ASSIGNMENT.match(line):
            latest.pop(key.group(2), None)  # a reassigned key moves to its new place
            latest[key.group(2)] = (i, line)
    return latest


def is_key_step(label: str) -> bool:
    """A label is a key-step when it holds non-commented code."""
    return bool(label.strip()) and not label.lstrip().startswith("#")


def uncomment(label: str) -> str:
    return label[len(COMMENT):] if label.startswith(COMMENT) else label.lstrip("# ")


def step_labels(lines: list[str], key_steps: list[bool]) -> list[str]:
    """Per-step labels from the running line and key-step flag of each step."""
    return [line if key else commented(line) for line, key in zip(lines, key_steps)]


def memories(labels: list[str]) -> list[list[str]]:
    """M_t for every step t: key-step lines strictly before t (a new list per step)."""
    out, memory = [], []
    for label in labels:
        out.append(list(memory))
        if is_key_step(label):
            memory.append(label)
    return out


def extract_memory_info(memory: list[str], empty: str = DEFAULT_EMPTY_MEMORY_INFO) -> str:
    """ExtractMemoryInfo: the ``pose_dict`` assignments of the memory, joined by newlines."""
    kept = [line for line in memory if POSE_DICT_ASSIGNMENT.match(line)]
    return "\n".join(kept) if kept else empty


def shift_boundaries(key_steps, k: int, rng) -> list[bool]:
    """Shifted-oracle key-step flags (paper 5.2, dataset-generation ablation).

    Every subtask boundary (a key-step after the first) moves by a uniform integer in
    [-k, k]; boundaries stay strictly increasing and every subtask keeps at least one step.
    ``rng`` is a ``numpy.random.Generator`` (seed it for determinism).
    """
    flags = [bool(f) for f in key_steps]
    T = len(flags)
    starts = [t for t, f in enumerate(flags) if f]
    if k <= 0 or len(starts) < 2:
        return flags
    inner = starts[1:]
    shifted = [b + int(rng.integers(-k, k + 1)) for b in inner]
    prev = starts[0]
    out = []
    for i, b in enumerate(shifted):
        room = T - (len(shifted) - i)  # leave one step for each later subtask
        b = min(max(b, prev + 1), room)
        out.append(b)
        prev = b
    new = [False] * T
    new[starts[0]] = True
    for b in out:
        new[b] = True
    return new


def relabel(labels: list[str], key_steps: list[bool]) -> list[str]:
    """Per-step labels for new key-step flags: the calls keep their order, each step runs the
    call of the last key-step at or before it."""
    calls = [label for label in labels if is_key_step(label)]
    lines, idx = [], -1
    for key in key_steps:
        idx = min(idx + key, len(calls) - 1)
        lines.append(calls[max(idx, 0)])
    return step_labels(lines, key_steps)


def shifted_labels(labels: list[str], k: int, rng) -> list[str]:
    """Oracle labels with every subtask boundary shifted by up to ``k`` steps."""
    return relabel(labels, shift_boundaries([is_key_step(x) for x in labels], k, rng))


def keystep_recall(predicted: list[str], oracle: list[str], window: int = 3) -> tuple[int, int]:
    """Key-step recall of one episode: ``(found, total)``, where ``total`` counts the oracle's key-steps
    and ``found`` those that ``predicted`` (one label per control step, the same length) also emits as a
    key-step, with the same text up to surrounding spaces, at most ``window`` steps before or after. Each
    predicted key-step matches at most one oracle key-step, the earliest it can."""
    wanted = [(t, line.strip()) for t, line in enumerate(oracle) if is_key_step(line)]
    offered = [(t, line.strip()) for t, line in enumerate(predicted) if is_key_step(line)]
    used, found = set(), 0
    for t, line in wanted:
        for i, (u, other) in enumerate(offered):
            if i not in used and other == line and abs(u - t) <= window:
                used.add(i)
                found += 1
                break
    return found, len(wanted)
