"""Reading ClevrSkills' per-trajectory folders (the format of its released dataset).

A trajectory folder ``traj_<seed>[_variant_<v>]/`` is what ClevrSkills' oracle
(``clevr_skills_oracle.py``) records; ``/work/shared/clevrskills_sample/README.md`` describes every
file. T is the number of actions; observation arrays hold T + 1 rows (the last observation comes
after the last action and is not imported). What this module reads:

=============================================  ====================  ===================================
file                                           shape                 use
=============================================  ====================  ===================================
``actions.npy``                                (T, 7) float64        actions, as they are
``success.npy``                                (T,) bool             success after each action
``action_trace.pickle.bz2``                    list of T stacks      code labels (``labels.py``)
``agent/{qpos,qvel}.npy``                      (T+1, Q) float32      proprio (xArm6: Q = 6 + 5 vacuum)
``agent/ee_pose.npy``                          (T+1, 7) float32      end-effector pose (world, wxyz)
``agent/vacuum_{on,grasping}.npy``             (T+1,) bool           suction state
``image/{base,hand}_camera/rgb.mp4``           T+1 frames            cameras (decoded with PyAV)
``extra/actor_mesh_bbox/base_camera/*.npy``    (T+1, 2, 3) int       per object [[x0, y0, 1], [x1, y1, 1]]
``extra/actor_is_visible/base_camera/*.npy``   (T+1,) float          1 when the object shows in the image
``extra/actors.npy``                           (T+1, 13 N) float32   per object pose (7) + velocities (6)
``camera_param/base_camera/*.npy``             (T+1, 4|3, 4|3)       intrinsics / extrinsics (OpenCV)
``info.json``, ``ep_info.json``                                      prompts, textures, seed, control mode
=============================================  ====================  ===================================

A trajectory that cannot be read raises :class:`TrajectoryError` with the reason (the importer
records it and goes on); a source folder holding no trajectory folder at all raises
:class:`ClevrSkillsFormatError` (a user error).
"""

from __future__ import annotations

import bz2
import io
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from configs.errors import UserError

TRAJ_DIR = re.compile(r"^traj_(\d+)(?:_variant_(\d+))?$")
MARKER_FILES = ("actions.npy", "action_trace.pickle.bz2")  # a traj_* folder with either is a trajectory
CAMERAS = {"base_rgb": "base_camera", "wrist_rgb": "hand_camera"}  # our key -> ClevrSkills camera
ACTOR_FILE = re.compile(r"^(?P<name>.+)_(?P<id>\d+)\.npy$")  # "<texture> <shape>_<actor id>.npy"
OBJ_TOKEN = re.compile(r"\{obj:(?P<name>[^}]*?)_(?P<id>\d+)\}")
TEX_TOKEN = re.compile(r"\{tex:(?P<key>[^}]*)\}")
KEYSTEP_TOKEN = "{ks:"


class ClevrSkillsFormatError(UserError, ValueError):
    """A source folder that holds no ClevrSkills trajectory folders."""


class TrajectoryError(Exception):
    """One trajectory cannot be imported; ``str(e)`` is the reason recorded in the manifest."""


# --------------------------------------------------------------------------- finding trajectories
def find_trajectories(src) -> list[str]:
    """Relative paths (sorted, '/'-separated) of the trajectory folders under ``src``: folders named
    ``traj_<seed>`` or ``traj_<seed>_variant_<v>`` holding ``actions.npy`` or the action trace.
    Raises :class:`ClevrSkillsFormatError` when there is none."""
    src = Path(src)
    found = []
    for root, dirs, files in os.walk(src):
        if TRAJ_DIR.match(os.path.basename(root)) and any(f in files for f in MARKER_FILES):
            found.append(Path(root).relative_to(src).as_posix())
            dirs[:] = []  # a trajectory folder holds no further trajectories
            continue
        dirs.sort()
    if not found:
        raise ClevrSkillsFormatError(
            f"SRC={src}: no ClevrSkills trajectory folders under it (traj_<seed>/ holding actions.npy and "
            f"action_trace.pickle.bz2, as ClevrSkills' oracle records them); is it ClevrSkills data?")
    return sorted(found)


def source_seed(rel: str) -> tuple[int, int]:
    """(ClevrSkills episode seed, variant) from a trajectory folder's name (variant 0 if none)."""
    m = TRAJ_DIR.match(Path(rel).name)
    return int(m.group(1)), int(m.group(2) or 0)


# --------------------------------------------------------------------------- the action trace
class _TraceUnpickler(pickle.Unpickler):
    """The action trace holds only builtins and numpy arrays/scalars: nothing else is loaded."""

    NUMPY = {"_reconstruct", "scalar", "ndarray", "dtype", "_frombuffer"}

    def find_class(self, module, name):
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                      "numpy._core.numeric") and name in self.NUMPY:
            import importlib

            for where in (module, module.replace("numpy._core", "numpy.core"),
                          module.replace("numpy.core", "numpy._core")):  # pickled by numpy 2 or 1
                try:
                    return getattr(importlib.import_module(where), name)
                except (ImportError, AttributeError):
                    continue
        raise pickle.UnpicklingError(f"it references {module}.{name}, which an action trace never holds")


def load_action_trace(path: Path) -> list[list[dict]]:
    """The action trace: per step the stack of active solvers, root first (see ``labels.py``)."""
    try:
        with bz2.open(path, "rb") as f:
            trace = _TraceUnpickler(io.BytesIO(f.read())).load()
    except FileNotFoundError:
        raise TrajectoryError(f"missing {path.name}") from None
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as e:
        raise TrajectoryError(f"{path.name} does not load ({type(e).__name__}: {e})") from None
    if not isinstance(trace, list) or not all(isinstance(s, list) and s and all(isinstance(d, dict) for d in s)
                                              for s in trace):
        raise TrajectoryError(f"{path.name} is not a list of solver stacks")
    return trace


# --------------------------------------------------------------------------- prompts and tasks
# ClevrSkills' task (its registered name) from its placeholder prompts ({obj:...}, {tex:...}),
# first match wins; the patterns follow the prompts of clevr_skills/tasks/*.py.
TASK_PROMPTS: list[tuple[str, re.Pattern]] = [(name, re.compile(p)) for name, p in [
    ("BalanceScale", r"keeping it in balance$"),
    ("FollowOrder", r"^Follow the motion for "),
    ("MoveWithoutHitting", r"^Match the pose of the end effector .*without hitting any objects"),
    ("MatchPose", r"^Match the pose of the end effector"),
    ("Move2d", r"^Take up the .* and move it to .* without hitting anything$"),
    ("Neighbour", r"^First put .* and then put the object that was at its "),
    ("NovelNounAdjective", r"^This is a "),
    ("NovelAdjective", r" than .*\. Put the "),
    ("NovelNoun", r" is \S+ and .* is \S+\. Put \S+ on \S+$"),
    ("Pick", r"^(Pick up|Grab|Lift) the "),
    ("PlaceNextTo", r"^(Pick and place|Place) \{obj:[^}]*\} (left of|right of|in front of|behind) \{obj:[^}]*\}$"),
    ("PlaceOnTop", r"^(Pick and place|Place) (\{obj:[^}]*\}|object with .*) on (\{obj:[^}]*\}|object with .*)$"),
    ("Push", r"^Push (\{obj:[^}]*\}|object with .*) towards "),
    ("Rearrange", r"^Rearrange to "),
    ("RotateSymmetry", r"^Rotate (objects with|identically textured objects)"),
    ("Rotate", r"^Rotate "),
    ("SwapRotate", r"^Swap positions of .* while rotating them"),
    ("Swap", r"^Swap positions of "),
    ("SortStack", r"^(Stack identically textured objects|Place identically textured objects on top of each other)$"),
    ("ThrowAndSort", r"in the identically textured areas by throwing$|^Throw .* in .* area"),
    ("Sort2d", r"in the identically textured areas$|^Put .* in .* area"),
    ("SingleStack", r"^Stack "),
    ("Throw", r"^(Throw|Hit) the "),
    ("Touch", r"^Touch( and push| and topple)?[ ,]"),
    ("Trace", r"^Trace the sequence of goals"),
]]


def clevrskills_task(prompts: list[str]) -> str | None:
    """ClevrSkills' task name from the placeholder prompts, with the variants our suite names
    differently: ``SingleStack`` + " and then topple the stack" -> ``SingleStackTopple``,
    + " in the reversed order" -> ``SingleStackReversed``. None when no pattern matches."""
    for prompt in prompts:
        for name, pattern in TASK_PROMPTS:
            if pattern.search(prompt):
                if name == "SingleStack" and prompt.endswith("and then topple the stack"):
                    return "SingleStackTopple"
                if name == "SingleStack" and "in the reversed order" in prompt:
                    return "SingleStackReversed"
                return name
    return None


def natural_prompt(prompt: str, textures: dict) -> str:
    """A placeholder prompt in plain language, as ClevrSkills' LLaVA converter writes it:
    ``{obj:yellow swirl triangle_21}`` -> "the yellow swirl triangle", ``{tex:<actor>_<id>}`` -> the
    texture's name, repeated spaces collapsed."""
    def texture(m):
        key = m.group("key")
        if key not in textures:
            raise TrajectoryError(f"prompt {prompt!r} names texture {key!r}, which info.json does not list")
        return str(textures[key][0])

    text = OBJ_TOKEN.sub(lambda m: " the " + m.group("name"), prompt)
    text = TEX_TOKEN.sub(texture, text)
    return re.sub(" +", " ", text).strip()


# --------------------------------------------------------------------------- videos
def decode_video(path: Path, frames: int) -> np.ndarray:
    """The first ``frames`` frames of an MP4 as (frames, H, W, 3) uint8 RGB, decoded with PyAV.

    A missing, damaged or truncated video raises :class:`TrajectoryError` (never a partial array).
    """
    import av

    if not path.is_file():
        raise TrajectoryError(f"missing {path.parent.name}/{path.name}")
    out = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise TrajectoryError(f"{path.parent.name}/{path.name} has no video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # one core per worker: the import parallelises over workers
            for frame in container.decode(stream):
                out.append(frame.to_ndarray(format="rgb24"))
                if len(out) == frames:
                    break
    except av.error.FFmpegError as e:  # FFmpeg's message, without the file name (reasons are counted)
        raise TrajectoryError(f"{path.parent.name}/{path.name} does not decode ({type(e).__name__}: "
                              f"{getattr(e, 'strerror', None) or e})") from None
    if len(out) < frames:
        raise TrajectoryError(f"{path.parent.name}/{path.name}: {len(out)} frames decode, {frames} needed "
                              f"(truncated video?)")
    return np.stack(out)


# --------------------------------------------------------------------------- a trajectory
@dataclass
class Trajectory:
    """The arrays of one trajectory folder that the importer uses (video decoding is separate)."""

    path: Path
    actions: np.ndarray                    # (T, 7) float64
    success: np.ndarray                    # (T,) bool
    trace: list[list[dict]]                # T solver stacks
    qpos: np.ndarray                       # (T+1, Q)
    qvel: np.ndarray                       # (T+1, Q)
    ee_pose: np.ndarray                    # (T+1, 7)
    vacuum_on: np.ndarray                  # (T+1,)
    vacuum_grasping: np.ndarray            # (T+1,)
    prompts: list[str]                     # placeholder prompts
    textures: dict                         # "<name>_<id>" -> [texture name, file]
    ep_info: dict
    actors: list[tuple[str, int]]          # (name, id), sorted by id
    bboxes: dict = field(default_factory=dict)    # (name, id) -> (T+1, 2, 3) base-camera boxes
    visible: dict = field(default_factory=dict)   # (name, id) -> (T+1,) visibility in the base camera
    actor_states: np.ndarray | None = None        # (T+1, 13 N), in the task's actor order
    intrinsic: np.ndarray | None = None           # (3, 3) base camera, first frame
    extrinsic: np.ndarray | None = None           # (4, 4) base camera, first frame (world -> camera)

    def __len__(self) -> int:
        return len(self.actions)


def _load(path: Path, name: str, **kw) -> np.ndarray:
    f = path / name
    if not f.is_file():
        raise TrajectoryError(f"missing {name}")
    try:
        return np.load(f, **kw)
    except (OSError, ValueError, EOFError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise TrajectoryError(f"{name} does not load ({type(e).__name__}: {first})") from None


def _actor_files(folder: Path) -> dict[tuple[str, int], Path]:
    out = {}
    if folder.is_dir():
        for f in folder.iterdir():
            m = ACTOR_FILE.match(f.name)
            if m:
                out[(m.group("name"), int(m.group("id")))] = f
    return out


def load_trajectory(path) -> Trajectory:
    """Read and check one trajectory folder (no video decoding); raises :class:`TrajectoryError`."""
    path = Path(path)
    actions = _load(path, "actions.npy")
    trace = load_action_trace(path / "action_trace.pickle.bz2")
    success = _load(path, "success.npy").astype(bool)
    T = len(actions)
    if actions.ndim != 2 or actions.shape[1] != 7 or T == 0:
        raise TrajectoryError(f"actions.npy has shape {actions.shape}, expected (T, 7)")
    if len(trace) != T or len(success) != T:
        raise TrajectoryError(f"{T} actions but {len(trace)} action-trace entries and {len(success)} success flags")
    agent = {k: _load(path, f"agent/{k}.npy") for k in ("qpos", "qvel", "ee_pose", "vacuum_on", "vacuum_grasping")}
    for k, a in agent.items():
        if len(a) < T:
            raise TrajectoryError(f"agent/{k}.npy has {len(a)} rows, {T + 1} expected")
    prompts, textures, ep_info = [], {}, {}
    if (path / "info.json").is_file():
        info = json.loads((path / "info.json").read_text())
        prompts, textures = list(info.get("prompts") or []), dict(info.get("textures") or {})
    if not prompts:  # the trace's root solver keeps them too
        prompts = list(trace[0][0].get("prompts") or [])
    if (path / "ep_info.json").is_file():
        ep_info = json.loads((path / "ep_info.json").read_text())
    boxes = _actor_files(path / "extra" / "actor_mesh_bbox" / "base_camera")
    if not boxes:
        raise TrajectoryError("missing extra/actor_mesh_bbox/base_camera/<object>_<id>.npy")
    actors = sorted(boxes, key=lambda a: (a[1], a[0]))
    traj = Trajectory(path, actions, success, trace, agent["qpos"], agent["qvel"], agent["ee_pose"],
                      agent["vacuum_on"].astype(bool), agent["vacuum_grasping"].astype(bool), prompts, textures,
                      ep_info, actors)
    vis = _actor_files(path / "extra" / "actor_is_visible" / "base_camera")
    for a in actors:
        traj.bboxes[a] = _load(boxes[a].parent, boxes[a].name)
        if len(traj.bboxes[a]) < T or traj.bboxes[a].shape[1:] != (2, 3):
            raise TrajectoryError(f"{boxes[a].name}: shape {traj.bboxes[a].shape}, expected ({T + 1}, 2, 3)")
        traj.visible[a] = np.load(vis[a]).astype(bool) if a in vis else np.ones(len(traj.bboxes[a]), bool)
    states = _load(path, "extra/actors.npy")
    if states.ndim != 2 or states.shape[1] != 13 * len(actors) or len(states) < T:
        raise TrajectoryError(f"extra/actors.npy has shape {states.shape}, expected ({T + 1}, {13 * len(actors)}) "
                              f"for {len(actors)} objects")
    traj.actor_states = states
    cam = path / "camera_param" / "base_camera"
    if (cam / "intrinsic_cv.npy").is_file() and (cam / "extrinsic_cv.npy").is_file():
        traj.intrinsic = np.load(cam / "intrinsic_cv.npy")[0]
        traj.extrinsic = np.load(cam / "extrinsic_cv.npy")[0]
    return traj
