"""When and in what pieces the autoencoder runs tiled (torch-free, so validation's memory
estimates can use it without importing torch; the tiling itself is `vae_tiling`)."""

from __future__ import annotations

# Decodes whose output has more pixels than this are tiled when tiling is "auto" (1024 x 1024).
AUTO_TILE_PIXELS = 1024 * 1024
DEFAULT_TILE_PIXELS = 512  # tile side in image pixels
DEFAULT_OVERLAP_PIXELS = 64  # overlap between neighbouring tiles in image pixels


def should_tile(mode: str, pixels: int) -> bool:
    """Whether to tile: mode "on"/"off", or "auto" above :data:`AUTO_TILE_PIXELS` output pixels."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"tiling mode must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and pixels > AUTO_TILE_PIXELS)
