"""Object-grounding VQA from bounding boxes (paper 4.2, "Object detection").

Each object's box centre is mapped to a coarse N x N grid of the image (N = 10 by default, as
ClevrSkills' converter); the VLM answers "(x, y)" with two integers in [0, N).
"""

from __future__ import annotations

import numpy as np

# obs/bboxes of an object that is not visible in the base image (imported ClevrSkills data, whose
# boxes come with a visibility flag): all four coordinates are NOT_VISIBLE. Our own simulator's
# boxes are projected meshes and never carry it.
NOT_VISIBLE = -1.0


def is_visible(box) -> bool:
    """False for the ``NOT_VISIBLE`` sentinel box (x1 and y1 below zero)."""
    return bool(box[2] >= 0 and box[3] >= 0)


def grid_cell(box, image_size: int, n: int = 10) -> tuple[int, int]:
    """Grid cell (column x, row y) of a pixel box [x0, y0, x1, y1] in an image_size image."""
    cx = (box[0] + box[2]) / 2
    cy = (box[1] + box[3]) / 2
    return (int(np.clip(cx / image_size * n, 0, n - 1)), int(np.clip(cy / image_size * n, 0, n - 1)))


def presence_question(name: str, cell: tuple[int, int]) -> str:
    return f"Is there a {name} at ({cell[0]}, {cell[1]})?"


def location_question(name: str) -> str:
    return f"Where is the {name}?"


def location_answer(cell: tuple[int, int]) -> str:
    return f"({cell[0]}, {cell[1]})"


def vqa_samples(names: list[str], boxes: np.ndarray, image_size: int, rng, n: int = 10,
                negatives: int = 1) -> list[tuple[str, str]]:
    """(question, answer) pairs for one frame: per visible object a location question, a positive
    presence question, and ``negatives`` presence questions at cells holding no object. Objects
    whose box is the ``NOT_VISIBLE`` sentinel get no question (the list may be empty)."""
    kept = [(name, b) for name, b in zip(names, boxes) if is_visible(b)]
    names = [name for name, _ in kept]
    cells = [grid_cell(b, image_size, n) for _, b in kept]
    out = []
    for name, cell in zip(names, cells):
        out.append((location_question(name), location_answer(cell)))
        out.append((presence_question(name, cell), "yes"))
        for _ in range(negatives):
            while True:
                other = (int(rng.integers(n)), int(rng.integers(n)))
                if other != cell:
                    break
            out.append((presence_question(name, other), "no"))  # names are unique in a scene
    return out
