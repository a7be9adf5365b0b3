"""Reading one image the same way for `seesay prepare` and for `seesay caption`.

`load_image_rgb(path, size)`:

1. refuses missing and zero-byte files, and decompression bombs: an image whose header claims
   more than `max_pixels` pixels (PIL's `Image.MAX_IMAGE_PIXELS`, about 89 megapixels, by
   default) is rejected before it is decoded;
2. decodes fully (a truncated file is an error, never silently grey-filled);
3. applies the EXIF orientation;
4. converts to RGB: grayscale (L, LA, 1), CMYK, YCbCr, palette (P), RGBA and 16/32-bit
   integer or float images (I;16, I, F: scaled to 0..255 from their bit depth) all become
   RGB; transparent pixels are composited on white;
5. resizes to `size` x `size` by squashing (no crop, aspect ratio not kept, as the
   Show-Attend-Tell tutorial does) with PIL's bicubic filter, which antialiases when
   shrinking. `size=None` keeps the original size.

It returns a uint8 array [H, W, 3] and raises `SeesayError("<path>: <reason>")` otherwise.

The same steps apply to image bytes (an upload), a PIL image or an HxWx3 / HxW uint8 array
(`read_image(source, size, name=...)`; `name` labels the errors). `ImageLoader(size)` is the
captioner's `preprocess`: any of those -> a uint8 tensor [3, size, size], exactly as `seesay
prepare` stored the training images.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from seesay.errors import SeesayError


def _to_rgb(img):  # type: ignore[no-untyped-def]
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.size and a.max() > 255):
            a = a / 257.0 if mode.startswith("I;16") or a.max() <= 65535 else a / 16843009.0
        elif mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def read_image(source: Any, size: int | None = None, *, max_pixels: int | None = None,
               name: str | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """`load_image_rgb` that also returns the original (width, height).

    `source` is a path, image bytes, a PIL image or a uint8 array [H, W, 3] / [H, W].
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "image bytes"
        if len(source) == 0:
            raise SeesayError(f"{label}: empty (0 bytes)")
        opener: Any = lambda: Image.open(io.BytesIO(bytes(source)))  # noqa: E731
    elif isinstance(source, Image.Image):
        label = name or "PIL image"
        opener = lambda: source.copy()  # noqa: E731
    elif isinstance(source, np.ndarray):
        label = name or "image array"
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (3, 4)):
            raise SeesayError(f"{label}: expected a uint8 array [H, W], [H, W, 3] or [H, W, 4], "
                              f"got {source.dtype} {tuple(source.shape)}")
        opener = lambda: Image.fromarray(np.ascontiguousarray(source))  # noqa: E731
    else:
        path = Path(source)
        label = name or str(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise SeesayError(f"{label}: file not found") from None
        except OSError as e:
            raise SeesayError(f"{label}: cannot read ({e.strerror or e})") from None
        if path.is_dir():
            raise SeesayError(f"{label}: is a directory, not an image file")
        if not path.is_file():
            raise SeesayError(f"{label}: not a file")
        if st.st_size == 0:
            raise SeesayError(f"{label}: empty file (0 bytes)")
        opener = lambda: Image.open(path)  # noqa: E731
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's bomb warning: we raise instead, just below
            img = opener()
        with img:
            w, h = img.size
            if limit and w * h > limit:
                raise SeesayError(f"{label}: decompression bomb ({w}x{h} = {w * h} pixels > limit {limit})")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
                if size is not None:
                    img = img.resize((int(size), int(size)), Image.BICUBIC)
                arr = np.asarray(img, dtype=np.uint8)
    except SeesayError:
        raise
    except Image.DecompressionBombError as e:
        raise SeesayError(f"{label}: decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise SeesayError(f"{label}: not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            raise SeesayError(f"{label}: truncated image ({msg})") from None
        raise SeesayError(f"{label}: broken image ({msg})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - defensive
        raise SeesayError(f"{label}: could not convert to RGB (shape {arr.shape})")
    return np.ascontiguousarray(arr), (int(w), int(h))


def load_image_rgb(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """One image as uint8 [size, size, 3] RGB (see the module doc); `SeesayError` when bad."""
    return read_image(path, size)[0]


class ImageLoader:
    """A captioner's `preprocess`: path, bytes, PIL image or array -> uint8 tensor [3, S, S].

    S is the size the training data was prepared at (None: keep the image's own size); the
    model's encoder then applies its own normalisation. Errors are one-line `SeesayError`s.
    """

    def __init__(self, image_size: int | None = None) -> None:
        self.image_size = int(image_size) if image_size else None

    def __call__(self, image: Any, *, name: str | None = None) -> Any:
        import torch

        if isinstance(image, torch.Tensor):  # already a decoded image: [3, H, W] uint8 or float in [0, 1]
            if image.dim() != 3 or image.shape[0] != 3:
                raise SeesayError(f"{name or 'image tensor'}: expected [3, H, W], got {tuple(image.shape)}")
            return image
        arr = read_image(image, self.image_size, name=name)[0]
        return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous()

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size or 0}
