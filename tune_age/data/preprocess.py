"""The one preprocessing definition: decoded RGB pixels -> the square uint8 image a model sees.

Training (through the decode cache), `predict`, `evaluate` and every exported model call
`square_resize`, so a photo gives the same pixels, and so the same probabilities, whichever
of them reads it:

    x = torch.from_numpy(rgb_hwc).permute(2, 0, 1)[None]   # 1 x 3 x H x W, uint8
    square_resize(x, 64, "crop")                           # 1 x 3 x 64 x 64, float, whole 0-255

`crop` cuts the centred square of side min(H, W); `pad` scales the long side to `size`
and pads the short one with black, centred. Resizing is bilinear with antialiasing
(a box-like filter when shrinking), and the result is rounded to whole 0-255 values as the
uint8 cache stores them. Written in plain torch so that torch.export and the ONNX exporter take it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SQUARE_MODES = ("crop", "pad")


def square_resize(images: torch.Tensor, size: int, square: str) -> torch.Tensor:
    """N x 3 x H x W pixels in 0-255 (uint8 or float) -> N x 3 x size x size float, rounded."""
    # Written for symbolic sizes too (the ONNX and torch.export programs keep H and W
    # dynamic): sizes only through sym_min/sym_max and arithmetic, no int() of one and no
    # branch on one (bilinear at the same size is the identity), and index_select rather
    # than a view (a narrowed view makes the exporter guard on which side is longer).
    x = images.float()
    h, w = x.shape[-2], x.shape[-1]
    if square == "crop":
        side = torch.sym_min(h, w)
        rows = torch.arange(side, device=x.device) + (h - side) // 2
        cols = torch.arange(side, device=x.device) + (w - side) // 2
        x = x.index_select(2, rows).index_select(3, cols)
        x = F.interpolate(x, size=[size, size], mode="bilinear", align_corners=False, antialias=True)
    else:
        scale = size / torch.sym_max(h, w)
        ih = torch.sym_max(1, math.floor(h * scale + 0.5))
        iw = torch.sym_max(1, math.floor(w * scale + 0.5))
        x = F.interpolate(x, size=[ih, iw], mode="bilinear", align_corners=False, antialias=True)
        top, left = (size - ih) // 2, (size - iw) // 2
        x = F.pad(x, [left, size - iw - left, top, size - ih - top])
    return x.round().clamp(0.0, 255.0)
