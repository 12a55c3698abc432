"""Rollout videos for TensorBoard and for disk.

``SummaryWriter.add_video`` needs moviepy (not a dependency here, and moviepy 2 removed the
``moviepy.editor`` module it imports). TensorBoard's video display is an animated GIF in an
image summary, so :func:`add_gif` encodes the GIF with Pillow and writes that same summary:
the videos appear, animated, in TensorBoard's *Images* tab. MP4 files are written next to the
logs with :func:`envs.video.write_mp4`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encode_gif(frames: list[np.ndarray], fps: int = 10) -> bytes:
    """(H, W, 3) uint8 frames -> animated GIF bytes (looping)."""
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, round(1000 / fps)), loop=0, optimize=False)
    return buf.getvalue()


def add_gif(writer, tag: str, frames: list[np.ndarray], step: int, fps: int = 10) -> None:
    """Add ``frames`` as an animated image to a ``torch.utils.tensorboard.SummaryWriter``."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    h, w = frames[0].shape[:2]
    image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=encode_gif(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def log_videos(videos, out_dir: str | Path | None, writer=None, step: int = 0, tag: str = "rollout/video",
               fps: int = 20, gif_stride: int = 2) -> list[Path]:
    """Write each :class:`policies.evaluator.Video` as ``<out_dir>/<name>.mp4`` (captioned base
    camera) and, with a ``writer``, as a GIF ``<tag>/<task>/seed<seed>`` (every
    ``gif_stride``-th frame). Returns the MP4 paths."""
    from envs.video import write_mp4

    paths = []
    for video in videos:
        frames = video.captioned()
        if out_dir is not None:
            path = Path(out_dir) / f"{video.name}.mp4"
            write_mp4(path, frames, fps=fps)
            paths.append(path)
        if writer is not None:
            add_gif(writer, f"{tag}/{video.task}/seed{video.seed}", frames[::gif_stride] + frames[-1:], step,
                    fps=max(1, fps // gif_stride))
    return paths
