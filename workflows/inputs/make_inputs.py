"""Draw the sample inputs of the saved workflows (64x64, like the bundled models' shapes data).

Run `python workflows/inputs/make_inputs.py` to regenerate them; the PNGs are committed so the saved
workflows run from a clean checkout.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
BACKGROUND = (40, 44, 52)


def shapes() -> Image.Image:
    """A red circle on the left and a blue square on the right, on a dark background."""
    image = Image.new("RGB", (64, 64), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 20, 28, 44), fill=(220, 30, 30))
    draw.rectangle((38, 22, 58, 42), fill=(30, 60, 220))
    return image


def background() -> Image.Image:
    """A plain 96x64 background of the same dark tone, the starting image of area composition: the
    areas then agree on one background (the bundled autoencoder's latent of a half-dark, half-light
    mix decodes to a purple haze)."""
    return Image.new("RGB", (96, 64), BACKGROUND)


def green_triangle() -> Image.Image:
    """A green triangle at the top, the high-resolution original of the super-resolution input.

    The input is its 4x4 box average (16x16), the degradation the bundled super-resolution model
    was trained to undo.
    """
    image = Image.new("RGB", (64, 64), (200, 200, 190))
    ImageDraw.Draw(image).polygon([(32, 4), (50, 34), (14, 34)], fill=(30, 170, 40))
    return image


def centre_mask() -> Image.Image:
    """White (1 = repaint) over the centre box, black elsewhere."""
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    return mask


def silhouette() -> Image.Image:
    """A ControlNet hint: the silhouette (white on black) of a large circle, below and right of the
    centre, where no caption's position word puts a shape."""
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(image).ellipse((26, 24, 54, 52), fill=(255, 255, 255))
    return image


def main() -> None:
    shapes().save(HERE / "shapes.png")
    background().save(HERE / "background_96x64.png")
    green_triangle().resize((16, 16), Image.Resampling.BOX).save(HERE / "lowres_16.png")
    centre_mask().save(HERE / "mask_centre.png")
    with_alpha = shapes().convert("RGBA")
    alpha = Image.eval(centre_mask(), lambda v: 255 - v)  # transparent where to repaint
    with_alpha.putalpha(alpha)
    with_alpha.save(HERE / "shapes_alpha_hole.png")
    silhouette().save(HERE / "silhouette.png")


if __name__ == "__main__":
    main()
