"""The font for text drawn on images (grid labels, embedding cards).

Pillow >= 10.1 ships a scalable font (`ImageFont.load_default(size=...)`, FreeType) whose spaces have a
real width; the fixed 11-pixel bitmap font it replaces has a space so narrow that "prompt alone" reads
"promptalone". Pillow built without FreeType only has the bitmap font, which is the fallback. Pillow is
imported when a font is asked for.
"""

from __future__ import annotations

from typing import Any


def label_font(size: int) -> Any:
    """A font about `size` pixels tall: the scalable default font, else the bitmap one (fixed size)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()
