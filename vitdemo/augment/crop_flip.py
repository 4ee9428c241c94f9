"""Random crop from the padded image and horizontal flip, per image, in one gather."""

from __future__ import annotations

import torch
from torch import Tensor

PADDING_MODES = ("constant", "reflect")


class RandomCropFlip:
    """A `size` x `size` window of each image padded by `padding` on every side (zeros, or the
    image reflected without repeating its edge, as F.pad(mode="reflect")), at an offset drawn
    uniformly per image, then mirrored left-right with probability 1/2 if `flip`: per image what
    `v2.RandomCrop(size, padding, padding_mode=padding_mode)` and `v2.RandomHorizontalFlip()` do,
    for the whole batch in one gather. The padding is never materialised: indices outside the
    image are mapped back inside (reflect) or masked to zero (constant).

    `padding` None or 0 crops without padding. A batch that is already `size` x `size`, with no
    padding and no flip, is returned as it is, and draws nothing.
    """

    def __init__(self, size: int, padding: int | None = 4, flip: bool = True, padding_mode: str = "constant") -> None:
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be 'constant' or 'reflect', got {padding_mode!r}")
        self.size, self.padding, self.flip, self.padding_mode = size, padding, flip, padding_mode

    def check(self, height: int, width: int) -> None:
        """Refuse images too small for a window of `size` even with the padding."""
        pad = self.padding or 0
        if min(height, width) + 2 * pad < self.size:
            raise ValueError(f"images {height}x{width} padded by {pad} are smaller than image_size {self.size}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, H, W) -> (B, C, size, size), of x's dtype and on x's device. The offsets and
        flips are drawn on the generator's device (the CPU without one: the global RNG)."""
        b, c, h, w = x.shape
        s, pad = self.size, self.padding or 0
        self.check(h, w)
        if not (pad or h != s or w != s or self.flip):
            return x
        dev = generator.device if generator is not None else torch.device("cpu")
        # Offsets into the (virtually) padded image.
        top = torch.randint(0, h + 2 * pad - s + 1, (b, 1), generator=generator, device=dev) - pad
        left = torch.randint(0, w + 2 * pad - s + 1, (b, 1), generator=generator, device=dev) - pad
        rows = top + torch.arange(s, device=dev)  # (b, s) source row of every output row
        cols = left + torch.arange(s, device=dev)
        if self.flip:
            flipped = torch.rand((b, 1), generator=generator, device=dev) < 0.5
            cols = torch.where(flipped, cols.flip(1), cols)
        inside = (rows >= 0) & (rows < h)
        inside = inside[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (b, s, s)
        if self.padding_mode == "reflect":
            rows, cols = reflect(rows, h), reflect(cols, w)
        rows, cols = rows.clamp(0, h - 1).to(x.device), cols.clamp(0, w - 1).to(x.device)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        out = x[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
        if self.padding_mode == "constant" and pad:
            out = out * inside[:, None].to(x.device)
        return out


def reflect(index: Tensor, size: int) -> Tensor:
    """Reflect-pad indices (without repeating the edge pixel), as F.pad(mode='reflect')."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)
