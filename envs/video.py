"""Frames to pictures: captioned frames, PNG grids and MP4 videos of episodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_FONT = ImageFont.load_default()


def caption(frame: np.ndarray, text: str, scale: int = 2, lines: int = 2) -> np.ndarray:
    """(H, W, 3) uint8 -> (H*scale + bar, W*scale, 3): upscaled frame with ``text`` below it."""
    img = Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
    bar = 12 * lines + 4
    out = Image.new("RGB", (img.width, img.height + bar), (20, 20, 20))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    width = max(8, img.width // 6)  # characters per line of the default 6-px font
    chunks = [text[i:i + width] for i in range(0, len(text), width)][:lines]
    for i, chunk in enumerate(chunks):
        draw.text((2, img.height + 2 + 12 * i), chunk, fill=(235, 235, 235), font=_FONT)
    return np.asarray(out)


def grid(rows: list[list[np.ndarray]], titles: list[str] | None = None) -> np.ndarray:
    """Equal-size frames arranged in rows, each row optionally with a title bar above it."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    title_h = 14 if titles else 0
    canvas = Image.new("RGB", (cols * w, len(rows) * (h + title_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, frames in enumerate(rows):
        y = r * (h + title_h)
        if titles:
            draw.text((3, y + 1), titles[r], fill=(0, 0, 0), font=_FONT)
        for c, f in enumerate(frames):
            canvas.paste(Image.fromarray(f), (c * w, y + title_h))
    return np.asarray(canvas)


def write_png(path: str | Path, image: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_mp4(path: str | Path, frames: list[np.ndarray], fps: int = 20) -> None:
    import imageio.v2 as imageio

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    frames = [f[: h - h % 2, : w - w % 2] for f in frames]  # yuv420p needs even sizes
    imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
