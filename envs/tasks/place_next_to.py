"""PlaceNextTo (L0): "Place the red cube to the left of the blue cylinder." Three objects.

Directions are seen from the base camera: left, right, behind (towards the robot), in front
of (towards the camera). The oracle computes the target spot at its first step and keeps it
in ``pose_dict`` (this line is what ExtractMemoryInfo later hands to the diffusion policy).

Success: the object stands on the table beside the reference on the asked side: its offset
along the direction is between touching and 12 cm, sideways less than max(radius, 4 cm).
"""

import numpy as np

from ..objects import sample_objects
from ..skills.api import DIRECTIONS
from ..skills.code import actor, assign, call, stored
from ..tabletop import Layout, TabletopEnv, place_apart
from .common import on_table, pick_and_place, xy
from .registry import register_task

PHRASES = {"left": "to the left of", "right": "to the right of", "behind": "behind", "front": "in front of"}


@register_task("PlaceNextTo", level="L0", max_steps=250)
class PlaceNextTo(TabletopEnv):
    def sample_layout(self, rng):
        while True:  # resample until some side of the reference has room (almost always at once)
            objects = sample_objects(rng, 3)
            poses = place_apart(rng, objects)
            a, b, c = objects
            sides = []
            for side, d in DIRECTIONS.items():
                spot = np.array(poses[1][:2]) + d * (a.radius + b.radius + 0.03)
                room = np.hypot(*(spot - np.array(poses[2][:2]))) > a.radius + c.radius + 0.03
                inside = -0.18 <= spot[0] <= 0.15 and -0.22 <= spot[1] <= 0.22
                if room and inside:
                    sides.append(side)
            if sides:
                side = str(rng.choice(sorted(sides)))
                return Layout(objects, poses, {"obj": a.name, "target": b.name, "direction": side})

    def prompt(self):
        p = self.layout.params
        return f"Place the {p['obj']} {PHRASES[p['direction']]} the {p['target']}."

    def evaluate_success(self):
        p = self.layout.params
        a, b = p["obj"], p["target"]
        d = DIRECTIONS[p["direction"]]
        offset = xy(self, a) - xy(self, b)
        along = float(offset @ d)
        across = abs(float(offset @ np.array([-d[1], d[0]])))
        touching = self.specs[a].radius * 0.7 + self.specs[b].radius * 0.7
        return on_table(self, a) and touching <= along <= 0.12 + touching and \
            across < max(self.specs[b].radius, 0.04)

    def oracle(self, api):
        p = self.layout.params
        yield assign("target", call("free_space_next_to", actor(p["obj"]), actor(p["target"]),
                                    direction=p["direction"]))
        yield from pick_and_place(api, p["obj"], stored("target"))
        yield call("done")
