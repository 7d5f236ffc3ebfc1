"""Images as ``data:`` URLs (base64 PNG), so the page carries them itself."""

from __future__ import annotations

import base64
import io
from typing import Any

THUMB = 64  # the longer side of a thumbnail, in pixels


def png_data_url(image: Any, limit: int | None = THUMB) -> str:
    """A uint8 C x H x W tensor (1 or 3 channels) as a PNG data URL, scaled down to at most ``limit`` pixels a side."""
    from PIL import Image

    array = image.permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array[:, :, 0], "L") if array.shape[2] == 1 else Image.fromarray(array, "RGB")
    if limit is not None and max(pil.size) > limit:
        pil.thumbnail((limit, limit))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnails(images_of: Any, rows: list[int]) -> dict[int, str]:
    """Data URLs of the split's images at ``rows`` (read in one go)."""
    import torch

    if not rows:
        return {}
    images = images_of(torch.tensor(rows, dtype=torch.long))
    return {row: png_data_url(images[k]) for k, row in enumerate(rows)}
