"""Task registry: names, levels (paper section 5.1) and gymnasium ids."""

from __future__ import annotations

from mani_skill.utils.registration import register_env

TASKS: dict[str, type] = {}
LEVELS: dict[str, list[str]] = {"L0": [], "L1": [], "held_out": [], "swap": []}
ENV_ID = "C2A-{}-v0"  # gymnasium id of a task


def register_task(name: str, *, level: str, max_steps: int):
    """Class decorator: register a task under ``name`` in ``level`` and with gymnasium."""

    def wrap(cls):
        cls.task_name = name
        cls.level = level
        cls.max_steps = max_steps
        TASKS[name] = cls
        LEVELS[level].append(name)
        return register_env(ENV_ID.format(name), max_episode_steps=max_steps)(cls)

    return wrap
