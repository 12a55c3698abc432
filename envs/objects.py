"""Object vocabulary of the suite: ClevrSkills' shapes and colours (paper Appendix E.1).

An object is named "<colour> <shape>", e.g. "red cube" or "blue hexagon", exactly the string
that ``get_actor(...)`` takes in the code labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import sapien

from .assets import shape_mesh

# name -> RGBA. Saturated and far apart so that they stay distinguishable at 128x128.
COLOURS: dict[str, tuple[float, float, float, float]] = {
    "cyan": (0.0, 0.85, 0.9, 1.0),
    "red": (0.9, 0.08, 0.08, 1.0),
    "white": (0.97, 0.97, 0.97, 1.0),
    "yellow": (0.98, 0.85, 0.05, 1.0),
    "black": (0.04, 0.04, 0.04, 1.0),
    "blue": (0.08, 0.2, 0.95, 1.0),
    "green": (0.05, 0.7, 0.12, 1.0),
    "purple": (0.55, 0.12, 0.8, 1.0),
}

# shape -> (prism sections, circumradius in m). All shapes stand on a flat face, so any of them
# can carry another one: stacking works for every pair.
SHAPES: dict[str, tuple[int, float]] = {
    "cube": (4, 0.035),
    "cylinder": (32, 0.028),
    "triangle": (3, 0.040),
    "hexagon": (6, 0.032),
}
# "<colour> <shape>" where a text mentions an object by name ("Place the red cube on top of ...")
OBJECT_NAME = re.compile(r"\b(?:%s) (?:%s)\b" % ("|".join(COLOURS), "|".join(SHAPES)))
OBJECT_HEIGHT = 0.05  # m, default height of an object
TALL_HEIGHT = 0.10  # m, height of the standing objects of Topple


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene: shape, colour and height (m)."""

    shape: str
    colour: str
    height: float = OBJECT_HEIGHT

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {sorted(SHAPES)}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; known: {sorted(COLOURS)}")

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def radius(self) -> float:
        """Circumradius of the footprint (m)."""
        return SHAPES[self.shape][1]

    def vertices(self) -> np.ndarray:
        """Mesh vertices in the object frame (V, 3), origin at the centre of mass."""
        sections, radius = SHAPES[self.shape]
        _, verts = shape_mesh(sections)
        return verts * np.array([radius, radius, self.height])


def sample_objects(rng: np.random.Generator, n: int, *, height: float = OBJECT_HEIGHT) -> list[ObjectSpec]:
    """``n`` objects with pairwise different names, uniformly over shapes x colours."""
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    idx = rng.choice(len(combos), size=n, replace=False)
    return [ObjectSpec(*combos[i], height=height) for i in idx]


def build_object(scene, spec: ObjectSpec, name: str):
    """Build a dynamic convex actor for ``spec`` in a ManiSkill scene; returns the Actor."""
    sections, radius = SHAPES[spec.shape]
    path, _ = shape_mesh(sections)
    scale = (radius, radius, spec.height)
    builder = scene.create_actor_builder()
    material = sapien.physx.PhysxMaterial(static_friction=0.8, dynamic_friction=0.6, restitution=0.0)
    builder.add_convex_collision_from_file(path, scale=scale, material=material, density=600)
    builder.add_visual_from_file(path, scale=scale,
                                 material=sapien.render.RenderMaterial(base_color=COLOURS[spec.colour],
                                                                       roughness=0.7))
    builder.initial_pose = sapien.Pose(p=[0, 0, spec.height / 2])
    return builder.build(name=name)
