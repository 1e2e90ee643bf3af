"""Small images for the drill-down: a sample's image, from its file or an array, fit in a square.

Pillow only (no torch). A file that is missing, outside the image root, or unreadable gives
``None``, never an exception: the caller shows :func:`placeholder` with a caption instead, so one
moved image never breaks a page of them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

THUMB_PX = 96
PLACEHOLDER_GREY = (200, 200, 200)


def image_path(root: str | Path, sample_id: str) -> Path | None:
    """``<root>/<sample_id>`` when it is a file inside ``root``, else None. A sample id from a
    table is user input: ``../`` or an absolute path must not read files elsewhere."""
    base = Path(root).expanduser().resolve()
    path = (base / str(sample_id)).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path


def fit(image: Image.Image, *, size: int = THUMB_PX) -> Image.Image:
    """``image`` as RGB, scaled to fit ``size`` x ``size`` with its aspect kept: shrunk
    smoothly, or enlarged with hard pixel edges (a 32 px CIFAR image stays readable)."""
    image = image.convert("RGB")
    scale = size / max(image.size)
    shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if scale >= 1:
        return image.resize(shape, Image.Resampling.NEAREST)
    image.thumbnail(shape, Image.Resampling.LANCZOS)
    return image


def read_thumbnail(path: str | Path, *, size: int = THUMB_PX) -> Image.Image | None:
    """The image file at ``path`` as a thumbnail, or None when it cannot be read as one."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced size, much faster
            return fit(image, size=size)
    except Exception:  # missing, truncated, not an image, a decompression bomb: no thumbnail
        return None


def array_thumbnail(array: np.ndarray, *, size: int = THUMB_PX) -> Image.Image | None:
    """An image held as numbers, (h, w), (h, w, c) or (c, h, w) with c in 1, 3, 4, scaled to
    0..255 by its own range; None when it is not shaped as an image."""
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or not a.size:
        return None
    a = np.nan_to_num(a)
    low, high = float(a.min()), float(a.max())
    scaled = (a - low) / (high - low) * 255 if high > low else np.zeros_like(a)
    return fit(Image.fromarray(scaled.round().astype(np.uint8)), size=size)


def placeholder(*, size: int = THUMB_PX, text: str = "missing") -> Image.Image:
    """A grey square with ``text`` in the middle: where an image could not be shown."""
    image = Image.new("RGB", (size, size), PLACEHOLDER_GREY)
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((0, 0), text)
    draw.text(((size - box[2]) / 2, (size - box[3]) / 2), text, fill=(90, 90, 90))
    return image


def png(image: Image.Image) -> bytes:
    """The image as PNG bytes (what a cache can hold and st.image shows)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
