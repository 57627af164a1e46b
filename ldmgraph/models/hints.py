"""Control-image preprocessors: Canny edges and a scribble / line-art threshold.

Canny (Canny 1986: Gaussian smoothing, Sobel gradients, non-maximum suppression, double threshold
with hysteresis) comes from kornia (`kornia.filters.canny`), the library ComfyUI's `Canny` node
uses, with thresholds on the gradient magnitude of the 0..1 grey image, so an imported ComfyUI
graph finds the same edges. Both take and return IMAGE arrays [B, H, W, C] in 0..1; the output
has three equal channels (white lines on black), as ControlNets expect their hint.
"""

from __future__ import annotations

import numpy as np


def canny_edges(images: np.ndarray, low_threshold: float = 0.4, high_threshold: float = 0.8) -> np.ndarray:
    """Edge map of images [B, H, W, C] (0..1): 1 on edges, 0 elsewhere, three channels."""
    import kornia.filters
    import torch

    if low_threshold > high_threshold:
        raise ValueError(f"low_threshold {low_threshold} is above high_threshold {high_threshold}")
    x = torch.from_numpy(np.ascontiguousarray(images[..., :3], dtype=np.float32)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    with torch.no_grad():
        _, edges = kornia.filters.canny(x, low_threshold, high_threshold)
    return edges.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)


def threshold_lines(images: np.ndarray, threshold: float = 0.5, invert: bool = False) -> np.ndarray:
    """Scribble / line-art binarisation: pixels whose luminance (Rec. 601) exceeds `threshold`
    become 1 (with `invert`, those below it: dark lines drawn on white paper), three channels."""
    rgb = np.asarray(images, np.float32)
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114 if rgb.shape[-1] >= 3 else rgb[..., 0]
    lines = grey < threshold if invert else grey > threshold
    return np.repeat(lines[..., None].astype(np.float32), 3, axis=-1)
