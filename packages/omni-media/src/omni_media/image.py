"""Images to encoder input: open safely, resize with Pillow, rescale, normalise, stack.

`ImageProcessor.for_config(kind, image_size)` gives the presets of transformers' SiglipImageProcessor
(squash to size x size) and CLIPImageProcessor (shortest edge to size, then a centre crop). Resizing is
done by Pillow on 8-bit RGB, as transformers' PIL backend does, so the pixels match it; transparency is
composited onto white first, as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from omni_media.errors import MediaError

if TYPE_CHECKING:
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, with any transparency composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """A file decoded in full as RGB; MediaError naming the file if it is missing, unreadable or truncated."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later inside the processor
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports broken files as OSError (truncated, unidentified) or SyntaxError (bad PNG chunks).
        raise MediaError(f"{path}: not a readable image: {' '.join(str(e).split())[:200]}") from None


@dataclass(frozen=True)
class ImageProcessor:
    size: int  # crop=None: resize to size x size; else the shortest edge becomes size
    crop: int | None  # centre-crop side after the resize
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: Literal["bicubic", "bilinear"] = "bicubic"
    rescale: float = 1 / 255

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.crop is not None and not 1 <= self.crop <= self.size:
            raise ValueError(f"crop must be in [1, size={self.size}], got {self.crop}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must be 3 values with std > 0, got {self.mean}, {self.std}")

    @classmethod
    def for_config(cls, kind: Literal["siglip", "clip"], image_size: int) -> ImageProcessor:
        """The preprocessing a SigLIP or CLIP checkpoint of this resolution was trained with."""
        if kind == "siglip":
            return cls(size=image_size, crop=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        if kind == "clip":
            return cls(size=image_size, crop=image_size, mean=CLIP_MEAN, std=CLIP_STD)
        raise ValueError(f"kind must be 'siglip' or 'clip', got {kind!r}")

    def resize(self, image: Image.Image) -> Image.Image:
        """Resized (and centre-cropped) like transformers' processors."""
        w, h = image.size
        if self.crop is None:
            return image.resize((self.size, self.size), _RESAMPLE[self.resample])
        # Shortest edge to `size`; the long edge is truncated, not rounded, as in transformers.
        if w <= h:
            new_w, new_h = self.size, int(self.size * h / w)
        else:
            new_w, new_h = int(self.size * w / h), self.size
        image = image.resize((new_w, new_h), _RESAMPLE[self.resample])
        top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
        return image.crop((left, top, left + self.crop, top + self.crop))

    def pixels(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One image -> (3, H, W) float32, normalised."""
        if isinstance(image, np.ndarray):
            if (
                image.dtype != np.uint8
                or image.ndim not in (2, 3)
                or (image.ndim == 3 and image.shape[2] not in (1, 3, 4))
            ):
                raise MediaError(
                    f"image array must be uint8 (H, W) or (H, W, 1|3|4), got {image.dtype} {image.shape}"
                )
            image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        elif not isinstance(image, Image.Image):
            raise MediaError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
        x = np.asarray(self.resize(to_rgb(image)), dtype=np.float32) * np.float32(self.rescale)  # (H, W, 3)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)

    def array(self, images: Image.Image | np.ndarray | list[Image.Image | np.ndarray]) -> np.ndarray:
        """An image or a list of them -> (B, 3, H, W) float32 in numpy (what ONNX Runtime takes)."""
        if not isinstance(images, list):
            images = [images]
        if not images:
            raise MediaError("no images given")
        return np.stack([self.pixels(im) for im in images])

    def __call__(self, images: Image.Image | np.ndarray | list[Image.Image | np.ndarray]) -> torch.Tensor:
        """An image or a list of them -> (B, 3, H, W) float32 tensor."""
        import torch  # only here: the processor itself is numpy and PIL, for the torch-free runtime

        return torch.from_numpy(self.array(images))


# ---------------------------------------------------------------------------------------------------- digit windows

DIGIT = 28  # MNIST's side


def locate(frames: np.ndarray) -> np.ndarray:
    """(T, S, S) grey frames -> (T, 2) top-left (y, x) of the 28 x 28 window centred on each frame's
    centre of mass (how MNIST centres its digits), kept inside the canvas; an empty frame gives its middle."""
    if frames.ndim != 3 or min(frames.shape[1:]) < DIGIT:
        raise MediaError(f"frames must be (T, S, S) with S >= {DIGIT}, got {frames.shape}")
    x = frames.astype(np.float64)
    mass = x.sum(axis=(1, 2))
    h, w = x.shape[1:]
    ys = (x.sum(axis=2) * np.arange(h)).sum(axis=1) / np.maximum(mass, 1e-9)
    xs = (x.sum(axis=1) * np.arange(w)).sum(axis=1) / np.maximum(mass, 1e-9)
    centre = np.where(mass[:, None] > 0, np.stack([ys, xs], axis=1), [[(h - 1) / 2, (w - 1) / 2]])
    corner = np.rint(centre - (DIGIT - 1) / 2).astype(np.int64)
    return np.clip(corner, 0, [h - DIGIT, w - DIGIT])


def digit_windows(frames: np.ndarray) -> np.ndarray:
    """(T, S, S) uint8 frames -> (T, 28, 28) uint8: each frame's window at `locate`, as the judges and
    the verifier read a digit in a clip."""
    return np.stack([frames[t, y : y + DIGIT, x : x + DIGIT] for t, (y, x) in enumerate(locate(frames))])
