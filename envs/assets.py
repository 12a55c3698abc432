"""Low-poly assets generated on first use into a cache folder.

Why generated: ManiSkill's Panda visual meshes (``*.glb``, 7k-21k triangles a link, plus a
425k-triangle RealSense mesh on the wrist-camera variants) make CPU (lavapipe) rendering about
10x slower. We take ManiSkill's own ``panda_stick.urdf`` (same kinematics and inertias), use its
*collision* STLs (200-300 triangles a link) as visuals, replace the stick by a suction cup and
add a camera mount. Object shapes are convex meshes made with trimesh. Nothing is downloaded.

The cache folder is ``$CODE2ACTION_CACHE`` or ``~/.cache/code2action``; files are written
atomically (temp file + rename) so parallel workers can race safely.
"""

from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

import numpy as np

ASSET_VERSION = 1  # bump when the generated geometry changes

# Link colours: Franka's white links with dark joints, so the arm reads well at 128 px.
_LINK_RGBA = {
    "panda_link0": "0.25 0.25 0.27 1",
    "panda_link1": "0.92 0.92 0.92 1",
    "panda_link2": "0.92 0.92 0.92 1",
    "panda_link3": "0.92 0.92 0.92 1",
    "panda_link4": "0.92 0.92 0.92 1",
    "panda_link5": "0.92 0.92 0.92 1",
    "panda_link6": "0.25 0.25 0.27 1",
    "panda_link7": "0.92 0.92 0.92 1",
    "panda_hand": "0.25 0.25 0.27 1",
}

# Suction tool geometry in the ``panda_hand`` frame (metres, z points out of the flange).
SUCTION_STEM = dict(radius=0.009, z_from=0.05, z_to=0.11)
SUCTION_CUP = dict(radius=0.016, z_from=0.11, z_to=0.12)
TCP_OFFSET = 0.12  # the cup's lip: the point that touches objects


def cache_dir() -> Path:
    root = Path(os.environ.get("CODE2ACTION_CACHE", Path.home() / ".cache" / "code2action"))
    path = root / f"assets-v{ASSET_VERSION}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _cylinder_xml(parent: ET.Element, tag: str, radius: float, z_from: float, z_to: float,
                  rgba: str | None = None) -> None:
    el = ET.SubElement(parent, tag)
    ET.SubElement(el, "origin", xyz=f"0 0 {(z_from + z_to) / 2}", rpy="0 0 0")
    geom = ET.SubElement(el, "geometry")
    ET.SubElement(geom, "cylinder", radius=str(radius), length=str(z_to - z_from))
    if rgba:
        mat = ET.SubElement(el, "material", name=f"m_{tag}_{radius}")
        ET.SubElement(mat, "color", rgba=rgba)


@lru_cache(maxsize=None)
def panda_suction_urdf() -> str:
    """Path of the low-poly Panda + suction-cup URDF (links ``panda_hand_tcp``, ``camera_link``)."""
    from mani_skill import PACKAGE_ASSET_DIR

    src_dir = Path(PACKAGE_ASSET_DIR) / "robots" / "panda"
    src = src_dir / "panda_stick.urdf"
    if not src.exists():
        raise FileNotFoundError(f"ManiSkill's Panda URDF is missing at {src}; reinstall mani-skill==3.0.1")
    tree = ET.parse(src)
    robot = tree.getroot()
    robot.set("name", "panda_suction")
    mesh_dir = src_dir / "franka_description" / "meshes" / "collision"

    for link in robot.findall("link"):
        name = link.get("name")
        for vis in link.findall("visual"):
            mesh = vis.find("geometry/mesh")
            if mesh is None:  # the stick of panda_stick: replaced below
                link.remove(vis)
                continue
            stem = Path(mesh.get("filename")).stem  # e.g. link3
            mesh.set("filename", str(mesh_dir / f"{stem}.stl"))
            mat = ET.SubElement(vis, "material", name=f"m_{name}")
            ET.SubElement(mat, "color", rgba=_LINK_RGBA.get(name, "0.8 0.8 0.8 1"))
        for col in link.findall("collision"):
            mesh = col.find("geometry/mesh")
            if mesh is None:
                link.remove(col)
            else:
                mesh.set("filename", str(src_dir / mesh.get("filename")))
        if name == "panda_hand":
            _cylinder_xml(link, "visual", rgba="0.55 0.55 0.58 1", **SUCTION_STEM)
            _cylinder_xml(link, "visual", rgba="0.1 0.1 0.1 1", **SUCTION_CUP)
            _cylinder_xml(link, "collision", **SUCTION_STEM)
            _cylinder_xml(link, "collision", **SUCTION_CUP)

    for joint in robot.findall("joint"):
        if joint.get("name") == "panda_hand_tcp_joint":
            joint.find("origin").set("xyz", f"0 0 {TCP_OFFSET}")

    # Wrist camera: on the hand, 6 cm off-axis, its optical (x) axis tilted 15 deg from the
    # tool axis (hand z) towards it, so the cup's lip and the object under it are in view.
    ET.SubElement(robot, "link", name="camera_link")
    cam = ET.SubElement(robot, "joint", name="camera_joint", type="fixed")
    ET.SubElement(cam, "parent", link="panda_hand")
    ET.SubElement(cam, "child", link="camera_link")
    ET.SubElement(cam, "origin", xyz="0.06 0 0.03", rpy="0 -1.83 0")

    out = cache_dir() / "panda_suction.urdf"
    data = ET.tostring(robot, encoding="utf-8")
    if not out.exists() or out.read_bytes() != data:
        _atomic_write(out, data)
    return str(out)


@lru_cache(maxsize=None)
def shape_mesh(sections: int) -> tuple[str, np.ndarray]:
    """Unit prism (circumradius 1, height 1, centred, z-up) with ``sections`` sides.

    Returns the .obj path and its vertices (V, 3). sections=4 is a box rotated so its faces
    align with the axes; 3 and 6 give the triangular and hexagonal prisms; 32 a cylinder.
    """
    import trimesh

    mesh = trimesh.creation.cylinder(radius=1.0, height=1.0, sections=sections)
    if sections == 4:  # align faces with x/y
        mesh.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 4, [0, 0, 1]))
    out = cache_dir() / f"prism_{sections}.obj"
    if not out.exists():
        _atomic_write(out, mesh.export(file_type="obj").encode())
    return str(out), np.asarray(mesh.vertices, dtype=np.float64)
