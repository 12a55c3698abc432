"""Code labels of imported ClevrSkills trajectories, from their action trace, at two levels.

The action trace holds, per step, the stack of active solvers from the task's root ``Solver`` down
to the one that emitted the action (``action_emitted``); each is a dict with ``solver_class``, the
instance ids ``solver_python_id`` / ``solver_random_id`` and its arguments (``actor`` as
``(name, id)``, ``target_actor``, ``target_pose`` as ``([x, y, z], [qw, qx, qy, qz])``,
``target_pose_name``, ``target_pose_function``, ...).

* **fine** (the paper's choice, section 4.1): the leaf solver that emitted the action, as a line of
  OUR skill API (the mapping table is in the README, "ClevrSkills data"). A line is a key-step on
  the first step of its solver instance (the ids change) and ``# ``-commented after. The target
  that a pick-and-place or a push got from its parent solver becomes a ``pose_dict['key'] = <query>``
  line, exactly as our oracles write them (``pose_dict['target'] = free_space_next_to(...)``), so
  ExtractMemoryInfo finds it; the stored position is ClevrSkills' own target. Every fine line
  parses with ``envs.skills.Interpreter``. It ends with ``done()`` at the first step that is solved
  (``success``) or whose action the root solver emits itself (all its predicates hold).
* **coarse**: the solver one level below the root, in the notation of ClevrSkills' own LLaVA
  converter (``pick_move3d_place(actor=get_actor('...'), target_pose=target_pose)``,
  ``target_pose = free_space_next_to(...)``, ``push(actor=...)``, ``done()``): text, not our API.
  A new line whenever that solver instance changes, ``done()`` at the first solved step.

After ``done()`` every step carries ``# done()``.
Our schema has one line per step, so when a solver start brings several lines (an assignment and
the call that uses it) they take consecutive steps, in order. A solver with no mapping raises
:class:`LabelMappingError` (the importer skips the trajectory with that reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from envs.skills.code import actor, assign, call, stored

from ..labels import step_labels

# parents whose own emitted actions are holds (waiting, settling): such a step continues the running line
COORDINATORS = ("PickMove3dPlaceSolver", "PushSolver", "Move3dTouchSolver", "ToppleStructure")
LEAVES = ("Move3dSolver", "PickSolver", "PlaceSolver", "PlaceOnActorSolver", "PushAlongPathSolver", "TouchSolver")
OBJ = re.compile(r"^\{obj:(?P<name>.*)_(?P<id>\d+)\}$")
GOOD_PLACE = re.compile(r"^a good place to \w+ \{obj:(?P<name>.*)_(?P<id>\d+)\}$")
RETREAT = "neutral pose"  # "neutral pose", "neutral pose away from actor": the skill's own back-off
# ClevrSkills' NextTo descriptions -> our direction words: the word its prompt uses. ClevrSkills'
# "left of" is the robot's left (+y), which its base camera shows on the image's right; our API's
# words are as seen from our base camera. So an imported line names the side its prompt names.
DIRECTION_WORDS = {"left of": "left", "right of": "right", "in front of": "front", "behind": "behind"}


class LabelMappingError(Exception):
    """A solver (or solver argument) that has no mapping at this level; ``str(e)`` is the reason."""


@dataclass
class Labels:
    """Per-step labels of one level: ``code`` (T,) (key-step plain, later steps ``# ``-commented),
    ``key_step`` (T,) and the ``pose_dict`` the code's reads refer to (key -> position (3,))."""

    code: list[str]
    key_step: list[bool]
    pose_dict: dict = field(default_factory=dict)

    @property
    def key_lines(self) -> list[str]:
        return [c for c, k in zip(self.code, self.key_step) if k]


def _ident(solver: dict) -> tuple:
    return solver.get("solver_class"), solver.get("solver_python_id"), solver.get("solver_random_id")


def emitter_index(stack: list[dict]) -> int:
    """Depth of the solver that emitted the step's action (the deepest flagged one, else the leaf)."""
    flagged = [i for i, s in enumerate(stack) if s.get("action_emitted")]
    return flagged[-1] if flagged else len(stack) - 1


def done_step(trace: list[list[dict]], success) -> int | None:
    """The first step that is solved or whose action the root solver emitted (None if neither)."""
    for t, stack in enumerate(trace):
        if bool(success[t]) or emitter_index(stack) == 0:
            return t
    return None


def _name(actor_field, what: str) -> str:
    if not (isinstance(actor_field, (tuple, list)) and len(actor_field) == 2 and isinstance(actor_field[0], str)):
        raise LabelMappingError(f"{what} is {actor_field!r}, expected (name, id)")
    return actor_field[0]


def _position(pose_field) -> tuple[float, float, float]:
    return tuple(float(v) for v in pose_field[0])


# --------------------------------------------------------------------------- placing lines on steps
def place_lines(events: list[tuple[int, list[str]]], T: int) -> tuple[list[str], list[bool]]:
    """Per-step (lines, key flags) from ``events`` (step, lines) in order: each line is a key-step
    on its own step, at its event's step or right after the previous line (one line per step);
    the steps before the first line run the first line. Raises when the lines do not fit."""
    placed: list[tuple[int, str]] = []
    for step, lines in events:
        for line in lines:
            at = max(step, placed[-1][0] + 1) if placed else 0
            placed.append((at, line))
    if not placed:
        raise LabelMappingError("the action trace yields no code line")
    if placed[-1][0] >= T:
        raise LabelMappingError(f"{len(placed)} code lines do not fit into {T} steps")
    running, key, i = [], [False] * T, 0
    for t in range(T):
        if i < len(placed) and placed[i][0] == t:
            key[t] = True
            i += 1
        running.append(placed[i - 1][1])
    return running, key


# --------------------------------------------------------------------------- fine level (our API)
@dataclass
class _Target:
    expr: str | None = None        # the argument that names the target (a get_actor or pose_dict read)
    lift_only: bool = False        # a pick-and-place without a target: lift and hold (ClevrSkills' Pick)
    name: str | None = None        # ClevrSkills' name of the target pose (the carrying Move3dSolver's)


class _FineState:
    """Targets of the parent solvers seen so far and the episode's ``pose_dict``."""

    def __init__(self):
        self.targets: dict[tuple, _Target] = {}
        self.pose_dict: dict[str, tuple[float, float, float]] = {}

    def key_for(self, base: str, value) -> str:
        """``base``, or ``base_2``, ``base_3``... when ``base`` already holds another position."""
        key, n = base, 1
        while key in self.pose_dict and np.linalg.norm(np.subtract(self.pose_dict[key], value)) > 1e-4:
            n += 1
            key = f"{base}_{n}"
        return key

    def target(self, parent: dict) -> tuple[_Target, list[str]]:
        """The parent's target (computed once per parent instance) and, the first time, the lines
        that store it in ``pose_dict``."""
        ident = _ident(parent)
        if ident in self.targets:
            return self.targets[ident], []
        cls, fn = parent["solver_class"], parent.get("target_pose_function")
        lines: list[str] = []
        tgt = _Target()
        if cls in ("PickMove3dPlaceSolver", "PushSolver"):
            x = _name(parent.get("actor"), f"{cls}'s actor")
            if cls == "PickMove3dPlaceSolver":
                y = parent.get("target_actor")
                tgt.name = parent.get("target_pose_name") or (f"{{obj:{y[0]}_{y[1]}}}" if y else None)
            if fn == "in_area" and parent.get("area_actor") and parent.get("target_pose") is not None:
                words = DIRECTION_WORDS.get(str(parent.get("area_description")))
                if words is None:
                    raise LabelMappingError(f"{cls} area_description {parent.get('area_description')!r} "
                                            f"has no direction")
                value = _position(parent["target_pose"])
                key = self.key_for("target", value)
                query = call("free_space_next_to", actor(x), actor(_name(parent["area_actor"], "area_actor")),
                             direction=words)
                lines.append(assign(key, query))
                self.pose_dict[key] = value
                tgt.expr = stored(key)
            elif fn == "free_space" and parent.get("target_pose") is not None:
                value = _position(parent["target_pose"])
                key = self.key_for("free", value)
                lines.append(assign(key, call("free_space", actor(x))))
                self.pose_dict[key] = value
                tgt.expr = stored(key)
            elif cls == "PushSolver" and fn in (None, "towards") and parent.get("target_actor"):
                tgt.expr = actor(_name(parent["target_actor"], "PushSolver's target_actor"))
            elif cls == "PickMove3dPlaceSolver" and fn is None and parent.get("target_pose") is None:
                if parent.get("target_actor"):  # on top of an object
                    tgt.expr = actor(_name(parent["target_actor"], "target_actor"))
                else:  # ClevrSkills' Pick: lift and hold
                    tgt.lift_only = True
            else:
                raise LabelMappingError(f"{cls} with target_pose_function {fn!r} has no fine mapping")
        self.targets[ident] = tgt
        return tgt, lines


def _fine_leaf(leaf: dict, parent: dict | None, target: _Target | None) -> str | None:
    """Our line for a leaf solver instance; None: it continues the running line."""
    cls = leaf["solver_class"]
    if cls == "Move3dSolver":
        name = str(leaf.get("target_pose_name") or "")
        if name.startswith(RETREAT):
            return None
        if target is not None and parent and parent["solver_class"] == "PickMove3dPlaceSolver" \
                and target.name is not None and name == target.name:
            return None if target.lift_only else call("move3d", target.expr)
        m = OBJ.match(name) or GOOD_PLACE.match(name)
        if m:
            return call("move3d", actor(m.group("name")))
        raise LabelMappingError(f"Move3dSolver to {name!r} has no fine mapping")
    x = _name(leaf.get("actor"), f"{cls}'s actor")
    if cls == "PickSolver":
        return call("pick", actor(x))
    if cls in ("PlaceSolver", "PlaceOnActorSolver"):
        if leaf.get("target_actor"):
            return call("place", actor(x), actor(_name(leaf["target_actor"], "target_actor")))
        if target is None or target.expr is None:
            raise LabelMappingError(f"{cls} without a target its parent names")
        return call("place", actor(x), target.expr)
    if cls == "PushAlongPathSolver":
        if target is None or target.expr is None:
            raise LabelMappingError("PushAlongPathSolver without a PushSolver target")
        return call("push", actor(x), towards=target.expr)
    if cls == "TouchSolver":
        if leaf.get("topple"):
            return call("topple", actor(x))
        return call("touch", actor(x), push=True) if leaf.get("push") else call("touch", actor(x))
    raise LabelMappingError(f"solver class {cls} has no fine mapping")


def fine_labels(trace: list[list[dict]], success) -> Labels:
    """Fine labels (our API) of a trajectory; raises :class:`LabelMappingError`."""
    T = len(trace)
    end = done_step(trace, success)
    if end is None:
        raise LabelMappingError("never solved (no successful step, the root solver never finishes)")
    state = _FineState()
    events: list[tuple[int, list[str]]] = []
    running = None
    for t in range(end):
        stack = trace[t]
        e = emitter_index(stack)
        for s in stack[1:]:
            if s.get("solver_class") not in COORDINATORS + LEAVES:
                raise LabelMappingError(f"solver class {s.get('solver_class')} has no fine mapping")
        leaf = stack[e]
        if _ident(leaf) == running:
            continue
        running = _ident(leaf)
        lines = []
        parent, target = None, None
        for s in stack[1:e + 1]:  # parents first: their pose_dict lines come before the call
            if s["solver_class"] in COORDINATORS:
                parent = s
                target, new = state.target(s)
                lines += new
        if leaf["solver_class"] not in COORDINATORS:  # a coordinator's own hold continues the line
            line = _fine_leaf(leaf, parent, target)
            if line is not None:
                lines.append(line)
        if lines:
            events.append((t, lines))
    events.append((end, [call("done")]))
    lines, key = place_lines(events, T)
    return Labels(step_labels(lines, key), key, dict(state.pose_dict))


# --------------------------------------------------------------------------- coarse level (ClevrSkills' notation)
def _arg(actor_field, kw: str | None = None) -> str:
    text = f"get_actor('{_name(actor_field, kw or 'actor')}')"
    return f"{kw}={text}" if kw else text


def coarse_lines(at: dict, prompt: str = "") -> list[str]:
    """The lines of ClevrSkills' converter notation for one level-1 solver (its start)."""
    cls = at.get("solver_class")
    if cls in ("PickMove3dPlaceSolver", "PushSolver"):
        a = _arg(at.get("actor"), "actor")
        head = "pick_move3d_place" if cls == "PickMove3dPlaceSolver" else "push"
        lines = [f"pose_dict['{_name(x, 'store_pose')}'] = get_pose({_arg(x, 'actor')})"
                 for x in at.get("store_pose", [])]
        args = [a]
        fn = at.get("target_pose_function")
        if fn is not None:
            name = _name(at.get("actor"), "actor")
            if fn == "free_space":
                args.append(f"target_pose=free_space({a})")
            elif fn == "swap":
                lines.append(f"pose_dict['{name}'] = get_pose({a})")
                args.append(f"target_pose=pose_dict['{_name(at.get('target_actor'), 'target_actor')}']")
            elif cls == "PushSolver":
                pass  # e.g. 'towards': the converter names no target
            elif fn == "rotate":
                angle = -at["angle"] if at.get("restore") else at["angle"]
                lines.append(f"target_pose = rotate_z(get_pose({a}), {angle})")
                args.append("target_pose=target_pose")
            elif fn == "rearrange":
                args.append(f"target_pose=get_actor_pose(image='{at.get('target_pose_image')}', {a})")
            elif fn == "rearrange_replace":
                args.append(f"target_pose=pose_dict['{name}']")
            elif fn == "swap_rotate":
                other = _name(at.get("target_actor"), "target_actor")
                lines.append(f"target_pose = rotate_z(Pose(pose_dict['{other}'].p, pose_dict['{name}'].q), "
                             f"{at['angle']})")
                args.append("target_pose=target_pose")
            elif fn == "on_top":
                if at.get("target_image") and at["target_image"] in prompt:
                    lines.append(f"target_actor = get_supporting_actor(\"{at['target_image']}\", \"{name}\")")
                    args.append("target_actor=target_actor")
                else:
                    args.append(_arg(at.get("target_actor"), "target_actor"))
            elif fn == "in_area":
                if not at.get("area_actor"):
                    raise LabelMappingError(f"{cls} in_area without an area_actor has no coarse mapping")
                d = [float(v) for v in at["area_direction"]]
                lines.append(f"target_pose = free_space_next_to({a}, {_arg(at['area_actor'], 'next_to_actor')}, "
                             f"direction=[{d[0]:.1f}, {d[1]:.1f}, {d[2]:.1f}], "
                             f"description=\"{at.get('area_description')}\")")
                args.append("target_pose=target_pose")
        elif cls == "PushSolver":
            raise LabelMappingError("PushSolver without target_pose_function has no coarse mapping")
        elif at.get("target_pose") is None:
            if at.get("target_actor") is not None:
                args.append(_arg(at["target_actor"], "target_actor"))
        else:
            raise LabelMappingError(f"{cls} with a target pose but no target_pose_function has no coarse mapping")
        if cls == "PickMove3dPlaceSolver" and at.get("match_ori"):
            args.append("match_ori=True")
        return lines + [f"{head}({', '.join(args)})"]
    if cls == "PickSolver":
        return [f"pick({_arg(at.get('actor'), 'actor')})"]
    if cls == "Move3dTouchSolver":
        extra = (", push=True" if at.get("push") else "") + (", topple=True" if at.get("topple") else "")
        return [f"touch({_arg(at.get('actor'), 'actor')}{extra})"]
    if cls in ("ToppleStructure", "BalanceScaleSolver"):
        key, head = ("actors", "topple_structure") if cls == "ToppleStructure" else ("objects", "balance_scale")
        items = ", ".join(f"({_arg(x)})" for x in at.get(key, []))
        return [f"{head}([{items}])"]
    if cls == "PickMove3dThrowSolver":
        extra = (", target_2d=True" if at.get("target_2d") else "") + \
                (", topple_target=True" if at.get("topple_target") else "")
        return [f"hit({_arg(at.get('throw_actor'))}, {_arg(at.get('target_actor'))}{extra})"]
    raise LabelMappingError(f"solver class {cls} has no coarse mapping")


def coarse_labels(trace: list[list[dict]], success, prompt: str = "") -> Labels:
    """Coarse labels (ClevrSkills' converter notation): a new line whenever the level-1 solver
    instance changes, ``done()`` at the first solved step; raises :class:`LabelMappingError`."""
    T = len(trace)
    events: list[tuple[int, list[str]]] = []
    running = None
    solved = False
    for t, stack in enumerate(trace):
        if len(stack) >= 2 and _ident(stack[1]) != running:
            running = _ident(stack[1])
            events.append((t, coarse_lines(stack[1], prompt)))
        if bool(success[t]):
            events.append((t, ["done()"]))
            solved = True
            break
    if not solved:
        raise LabelMappingError("never solved (no successful step)")
    lines, key = place_lines(events, T)
    return Labels(step_labels(lines, key), key, {})
