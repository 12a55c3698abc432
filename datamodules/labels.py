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
DEFAULT_EMPTY_MEMORY_INFO = "None"  # the paper's symbol was lost; we use the literal "None"


def commented(line: str) -> str:
    return COMMENT + line


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
