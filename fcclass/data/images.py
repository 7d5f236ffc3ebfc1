"""Image files: decoding any Pillow mode to uint8 L or RGB, a thread-safe decompression-bomb guard, resizing
and channel conversion. Training, evaluation and prediction all read pixels through ``load_resized``."""

from __future__ import annotations

import io
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from fcclass.errors import DataError, NotAnImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default bomb limit (~0.25 GB of RGBA), enforced as an error
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what Pillow's convert("L") uses

# The guard below checks every image's pixel count itself, so Pillow's own warning (emitted for the same images,
# through a process-wide setting another library may change) is noise. Filtering it once here, instead of with
# warnings.catch_warnings() around each decode, keeps decoding on several threads safe: catch_warnings swaps the
# process-wide filter list, and two threads doing so at once restore each other's state.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, channels, H, W): gray to RGB by repeating, RGB to gray by luma."""
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 3 and c == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and c == 3:
        w = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"Cannot convert {c}-channel images to {channels} channels; set data.channels to 1 or 3.")


def resize_uint8(x: torch.Tensor, size: Sequence[int] | None, chunk: int = 4096) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (N, C, H, W) images, in chunks to bound memory."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    out = []
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].float()
        part = F.interpolate(part, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        out.append(part.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _open_checked(path: Path) -> Any:
    """Open an image lazily (header only) after refusing what must not be read: special files and bombs."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}).") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a folder, not an image.")
    if not stat.S_ISREG(mode):  # a FIFO would block forever, a device could be endless
        raise DataError(f"{path}: not a regular file (a pipe, socket or device); refused.")
    return _open_image(path, path)


def _open_image(source: Path | BinaryIO, name: str | Path) -> Any:
    """Pillow's lazy open of a file or an in-memory upload, refusing bombs; errors name ``name``."""
    try:
        img = Image.open(source)
    except Image.DecompressionBombError:
        raise DataError(_bomb_message(name)) from None
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an image file Pillow can read (corrupt, empty or another format).") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: cannot decode image ({e}); the file is corrupt or truncated.") from None
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise DataError(_bomb_message(name))
    return img


def _bomb_message(path: str | Path) -> str:
    return f"{path}: image is too large (over {MAX_IMAGE_PIXELS:,} pixels); refused as a possible decompression bomb. Downscale it first."


def load_image(path: str | Path, channels: int) -> torch.Tensor:
    """Decode one image file to uint8 (channels, H, W). Raises DataError naming the file."""
    path = Path(path)
    return _pixels(_open_checked(path), path, channels)


def _pixels(opened: Any, name: str | Path, channels: int) -> torch.Tensor:
    import numpy as np

    with opened as img:
        try:
            img = _to_mode(ImageOps.exif_transpose(img), "L" if channels == 1 else "RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{name}: cannot decode image ({e}); the file is corrupt or truncated.") from None
    t = torch.from_numpy(np.array(img, dtype=np.uint8))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def load_resized(path: str | Path, channels: int, size: Sequence[int]) -> torch.Tensor:
    """One image file as the model sees it before normalisation: uint8 (channels, *size). Shared by every path."""
    return resize_uint8(load_image(path, channels).unsqueeze(0), size)[0]


def decode_resized(data: bytes, name: str, channels: int, size: Sequence[int]) -> torch.Tensor:
    """An image file's bytes (an upload, say) as ``load_resized`` gives the file: the same decoder, bomb guard,
    conversion and resize. Raises DataError starting with ``name``."""
    if not data:
        raise NotAnImageError(f"{name}: empty file (0 bytes), not an image.")
    image = _pixels(_open_image(io.BytesIO(data), name), name, channels)
    return resize_uint8(image.unsqueeze(0), size)[0]


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the file's header."""
    with _open_checked(Path(path)) as img:
        width, height = img.size
        if img.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap the axes
            width, height = height, width
    return height, width


def _to_mode(img: Any, mode: str) -> Any:
    """Convert any Pillow mode (RGBA, P, CMYK, 16-bit, float) to L or RGB."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if img.mode != "F" else (255.0 if arr.max(initial=0) <= 1.0 else 1.0)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white, as viewers show it
        img = Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert(mode)


def is_image_name(path: Path) -> bool:
    """An image file name that is not hidden: macOS's AppleDouble '._name.png' files and '.name' files are skipped."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files and folders skipped), sorted."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if is_image_name(p) and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]))


def decode_threads() -> int:
    """Pillow releases the GIL while reading and decoding, so a few threads per core overlap I/O and decoding."""
    return min(8, (os.cpu_count() or 1) + 2)


def unreadable(files: Iterable[Path], full_decode: bool = False, channels: int = 3) -> list[tuple[Path, str]]:
    """The files that cannot be read, each with why: headers only (fast; catches non-images, empty files, bombs),
    or ``full_decode`` (also truncated pixel data). Checked on threads; every bad file is reported, not the first."""

    def check(path: Path) -> str | None:
        try:
            if full_decode:
                load_image(path, channels)
            else:
                _open_checked(path).close()
        except DataError as e:
            return str(e).removeprefix(f"{path}: ")
        return None

    files = list(files)
    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        results = list(pool.map(check, files))
    return [(f, why) for f, why in zip(files, results) if why is not None]


def unreadable_error(bad: list[tuple[Path, str]], of: int | None = None, hint: str = "") -> DataError:
    """The error for files that cannot be read (every one counted, the first few named): of ``of`` files checked
    before training, or found while decoding; ``hint``: how else to go on."""
    what = f"{len(bad)} of {of:,} image file(s) cannot be read" if of is not None else f"Cannot read {len(bad)} image(s)"
    return DataError(f"{what}: {describe_bad_files(bad)}. Remove or replace these files and run again{hint}.")


def describe_bad_files(bad: list[tuple[Path, str]], shown: int = 10) -> str:
    """'a.png (why); b.png (why)', and how many more beyond ``shown``."""
    text = "; ".join(f"{path} ({why})" for path, why in bad[:shown])
    return text + (f"; and {len(bad) - shown} more" if len(bad) > shown else "")
