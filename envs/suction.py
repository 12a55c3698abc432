"""Vacuum gripper emulated with SAPIEN drives, as ClevrSkills' suction cup.

While suction is on and the cup's lip sits on a face of an object (the seal test below), a
stiff 6-DoF drive is created between the hand and that object, anchored at the cup's lip at
the current relative pose: the object hangs on the cup under gravity and collisions. Suction
off removes the drive. (Drives exist only while attached because a PhysX joint disables
collisions between the two bodies it links: a permanent drive would let the cup pass through
objects when pushing.)
"""

from __future__ import annotations

import numpy as np
import sapien

from .objects import ObjectSpec

_STIFFNESS = 1e4  # acceleration-mode drive: independent of the object's mass
_DAMPING = 2e2  # = 2 sqrt(stiffness): critically damped
# Seal test: the TCP must be within this distance of a face plane, inside the face outline.
_SEAL_GAP = 0.008
_SEAL_INSET = 0.85  # fraction of the circumradius the lip may be off-centre


class Suction:
    """Suction state machine; call :meth:`command` once per control step, before physics."""

    def __init__(self, scene, hand_link, tcp_link, objects: dict[str, tuple[object, ObjectSpec]]):
        self._scene = scene.sub_scenes[0]  # one env per process (physx_cpu)
        self._hand = hand_link
        self._tcp = tcp_link
        self._objects = objects
        self._drive = None
        self.on = False
        self.attached: str | None = None

    def release(self) -> None:
        if self._drive is not None:
            self._drive.entity.remove_component(self._drive)
            self._drive = None
        self.attached = None

    def reset(self) -> None:
        self.release()
        self.on = False

    def sealed_object(self) -> str | None:
        """Name of the object whose face the cup lip currently sits on, if any."""
        tcp = self._tcp.pose.sp.p
        for name, (actor, spec) in self._objects.items():
            pose = actor.pose.sp
            local = (pose.inv() * sapien.Pose(p=tcp)).p  # TCP in the object frame
            half = spec.height / 2
            # top (+z) or bottom (-z) face in the object frame, e.g. after toppling
            dz = abs(local[2]) - half
            if -0.003 <= dz <= _SEAL_GAP and np.hypot(local[0], local[1]) < _SEAL_INSET * spec.radius:
                return name
        return None

    def command(self, on: bool) -> None:
        self.on = bool(on)
        if not self.on:
            self.release()
            return
        if self.attached is None:
            name = self.sealed_object()
            if name is not None:
                self._attach(name)

    def _attach(self, name: str) -> None:
        actor, _ = self._objects[name]
        # Anchor at the cup's lip (the TCP), keeping the current cup-to-object transform: a
        # spring at the contact point, so a held object cannot swing like a pendulum.
        hand, tcp = self._hand.pose.sp, self._tcp.pose.sp
        d = self._scene.create_drive(self._hand._objs[0].entity, hand.inv() * tcp,
                                     actor._objs[0], actor.pose.sp.inv() * tcp)
        d.set_drive_target(sapien.Pose())
        for axis in ("x", "y", "z"):
            getattr(d, f"set_drive_property_{axis}")(_STIFFNESS, _DAMPING, mode="acceleration")
        d.set_drive_property_twist(_STIFFNESS, _DAMPING, mode="acceleration")
        d.set_drive_property_swing(_STIFFNESS, _DAMPING, mode="acceleration")
        self._drive = d
        self.attached = name

    def state(self) -> np.ndarray:
        """(2,) float32: [suction on, object attached]."""
        return np.array([float(self.on), float(self.attached is not None)], dtype=np.float32)
