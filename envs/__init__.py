"""ClevrSkills-style tabletop task suite on ManiSkill3, with a skill API and oracles.

>>> from envs import make_env, resolve_tasks
>>> env = make_env("PlaceOnTop", image_size=128)
>>> obs, info = env.reset(seed=0)        # obs: see ``TabletopEnv`` / README for shapes

Task selection by name: a task ("PlaceOnTop"), a level ("L0", "L1", "held_out", "swap",
"all"), a "+"-joined list of levels ("L0+L1") or a comma list of tasks.
"""

from __future__ import annotations

from configs.errors import UserError

from .vulkan import VulkanDriverMissing, check_vulkan, ensure_runtime_dir

ensure_runtime_dir()

from . import robot  # noqa: E402,F401  (registers the panda_suction agent)
from .tasks import ENV_ID, LEVELS, TASKS  # noqa: E402


class UnknownTaskError(UserError, ValueError):
    """A task or level name that the suite does not have."""


def resolve_tasks(spec, extra_tasks=()) -> list[str]:
    """Task names for ``spec`` (str or list), in registry order, without duplicates.
    ``extra_tasks``: other names accepted as themselves (tasks of an imported dataset)."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    names: list[str] = []
    for item in items:
        for part in str(item).replace("+", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                found = list(TASKS)
            elif part in LEVELS:
                found = LEVELS[part]
            elif part in TASKS or part in extra_tasks:
                found = [part]
            else:
                raise UnknownTaskError(
                    f"unknown task or level {part!r}; levels: {sorted(LEVELS)} + 'all', tasks: {sorted(TASKS)}")
            names += [n for n in found if n not in names]
    if not names:
        raise UnknownTaskError(f"no task selected by {spec!r}")
    return names


def cli_tasks(spec) -> list[str]:
    """For entry points: the tasks of ``spec`` after checking the Vulkan driver (raises
    :class:`UnknownTaskError` or :class:`VulkanDriverMissing`, both user errors)."""
    tasks = resolve_tasks(spec)
    check_vulkan()
    return tasks


def render_backend(name: str = "auto") -> str:
    """'auto' renders on the GPU when torch sees CUDA, else on the CPU (lavapipe)."""
    if name != "auto":
        return name
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def make_env(task: str, *, image_size: int = 128, obs_mode: str = "rgb", backend: str = "auto", **kwargs):
    """Create the environment of ``task`` (a single task name) with gymnasium ids ``C2A-<task>-v0``.

    Returns the unwrapped-by-default ManiSkill env (num_envs=1, physx_cpu). Raises
    :class:`UnknownTaskError` for a bad name and :class:`VulkanDriverMissing` without a driver.
    """
    if task not in TASKS:
        raise UnknownTaskError(f"unknown task {task!r}; tasks: {sorted(TASKS)}")
    check_vulkan()
    import gymnasium as gym

    try:
        env = gym.make(ENV_ID.format(task), image_size=image_size, obs_mode=obs_mode,
                       render_backend=render_backend(backend), **kwargs)
    except RuntimeError as e:
        if "rendering device" in str(e) or "Vulkan" in str(e) or "vk::" in str(e):
            from .vulkan import INSTALL_HINT

            raise VulkanDriverMissing(f"{e}\n{INSTALL_HINT}") from None
        raise
    return env.unwrapped


__all__ = ["make_env", "resolve_tasks", "cli_tasks", "render_backend", "TASKS", "LEVELS", "ENV_ID",
           "UnknownTaskError", "VulkanDriverMissing", "check_vulkan"]
