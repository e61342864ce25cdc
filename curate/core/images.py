"""Image sizes from file headers (no pixel decode), and safe path resolution inside a root.

Pillow's ``Image.open`` reads only the header; ``size`` is known before any pixel is decoded,
which is why budgeting a million images takes seconds rather than hours.
"""

from __future__ import annotations

import os
import re
import warnings

from PIL import Image, UnidentifiedImageError

# Pillow's own default limit; above it an image is treated as a decompression bomb.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ImageProblem(Exception):
    """An image that cannot be used; ``rule`` names the ledger reason."""

    def __init__(
        self, rule: str, detail: str, value: float | None = None, threshold: float | None = None
    ) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail
        self.value = value
        self.threshold = threshold


def resolve_in_root(root: str, relpath: str) -> str:
    """Join ``relpath`` to ``root`` as InternVL does and refuse anything that leaves the root.

    Symlinks are resolved first, so a link pointing outside the root is refused too.
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relpath))
    if os.path.commonpath([real_root, real]) != real_root:
        raise ImageProblem(
            "path_outside_root", f"{relpath!r} resolves to {real}, outside {real_root}"
        )
    return real


def read_image_size(path: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the header of the image at ``path``; raises ImageProblem."""
    if not os.path.exists(path):
        raise ImageProblem("image_missing", f"no file at {path}")
    if not os.path.isfile(path):
        raise ImageProblem("image_not_a_file", f"{path} is not a regular file")
    if os.path.getsize(path) == 0:
        raise ImageProblem("image_unreadable", f"{path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError as e:
        raise ImageProblem("image_too_large", f"{path}: {e}", threshold=max_pixels) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageProblem("image_unreadable", f"{path}: {type(e).__name__}: {e}") from e
    if width <= 0 or height <= 0:
        raise ImageProblem("image_unreadable", f"{path}: header gives size {width}x{height}")
    if width * height > max_pixels:
        raise ImageProblem(
            "image_too_large",
            f"{path}: {width}x{height} = {width * height} pixels (decompression bomb guard)",
            value=float(width * height),
            threshold=float(max_pixels),
        )
    return width, height


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_frames(folder: str) -> list[str]:
    """Frame files of a video stored as a folder of images, in natural order (frame2 < frame10)."""
    if not os.path.isdir(folder):
        raise ImageProblem(
            "video_unreadable",
            f"{folder} is not a folder of frames (extract a video's frames first)",
        )
    names = [n for n in os.listdir(folder) if n.lower().endswith(FRAME_SUFFIXES)]
    if not names:
        raise ImageProblem("video_unreadable", f"{folder} holds no frame images")
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def decode_error(path: str) -> str:
    """Why the pixels of ``path`` cannot be decoded ("" when they can).

    A header read (``read_image_size``) passes a truncated JPEG; only decoding finds it. JPEGs
    are decoded at 1/8 scale from their DCT coefficients (Pillow's ``draft``): the whole file
    is still read and checked, at a fraction of the cost."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.draft("RGB", (64, 64))
                im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure means the trainer cannot use it
        return f"{path}: {type(e).__name__}: {e}"
    return ""
