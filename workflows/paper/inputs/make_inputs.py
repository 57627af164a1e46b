"""Draw the sample inputs of the paper-release workflows (the releases work at 256x256; LDSR takes any size).

Run `python workflows/paper/inputs/make_inputs.py` to regenerate them; the PNGs are committed so the
workflows validate from a clean checkout.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def photo(size: int) -> Image.Image:
    """A sun over hills under a sky: flat colours, so the file stays small."""
    image = Image.new("RGB", (size, size), (120, 170, 230))
    draw = ImageDraw.Draw(image)
    s = size / 256
    draw.ellipse((170 * s, 30 * s, 220 * s, 80 * s), fill=(250, 210, 60))
    draw.polygon([(0, 180 * s), (90 * s, 120 * s), (200 * s, 170 * s), (size, 140 * s), (size, size), (0, size)],
                 fill=(60, 140, 70))
    return image


def centre_mask(size: int) -> Image.Image:
    """White (1 = repaint) over a box in the middle."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1), fill=255)
    return mask


def segmentation(size: int) -> Image.Image:
    """A label image: the class index in the red channel (three regions: labels 156, 125 and 0 of 182)."""
    image = Image.new("RGB", (size, size), (156, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.polygon([(0, size * 0.7), (size * 0.4, size * 0.45), (size, size * 0.6), (size, size), (0, size)],
                 fill=(125, 0, 0))
    draw.ellipse((size * 0.65, size * 0.1, size * 0.85, size * 0.3), fill=(0, 0, 0))
    return image


def main() -> None:
    photo(256).save(HERE / "photo.png")
    centre_mask(256).save(HERE / "photo_mask.png")
    photo(64).save(HERE / "lowres.png")
    segmentation(256).save(HERE / "segmentation.png")


if __name__ == "__main__":
    main()
