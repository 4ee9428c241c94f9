"""Random erasing (Zhong et al. 2020, "Random Erasing Data Augmentation", arXiv 1708.04896) of a
whole batch, with no draw read back to the host."""

from __future__ import annotations

import math

import torch
from torch import Tensor

ERASING_SCALE = (0.02, 0.33)  # erased share of the image (Zhong et al.; torchvision's and timm's default)
ERASING_RATIO = (0.3, 3.3)  # aspect ratio h / w of the erased box, drawn log-uniformly
ERASING_ATTEMPTS = 10  # boxes drawn per image before giving up, as torchvision


class RandomErasing:
    """With probability `p`, one box per image replaced by standard normal noise, drawn as
    `v2.RandomErasing(p, value="random")` draws it (`draws`). Meant for normalised images, so
    that the noise has the data's scale. p = 0 returns the batch as it is, and draws nothing."""

    def __init__(self, p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"erasing is a probability in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Float (B, C, H, W) -> the batch with its boxes erased. The boxes, then the noise, are
        drawn on the generator's device (the CPU without one: the global RNG)."""
        if self.p == 0:
            return x
        b, c, height, width = x.shape
        dev = generator.device if generator is not None else torch.device("cpu")
        _, i, j, h, w = (t.to(x.device) for t in self.draws(b, height, width, generator))
        # Per-pixel noise (torchvision's value="random", timm's mode "pixel"), drawn for the whole
        # batch so that the boxes never have to be read back to the host.
        noise = torch.randn((b, c, height, width), generator=generator, device=dev).to(x.device)
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        in_rows = (rows >= i[:, None]) & (rows < (i + h)[:, None])  # (B, H); empty where not applied
        in_cols = (cols >= j[:, None]) & (cols < (j + w)[:, None])
        box = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        return torch.where(box, noise.to(x.dtype), x)

    def draws(self, batch: int, height: int, width: int,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(apply bool (B,), i, j, h, w long (B,)): the box each image erases, drawn as
        `v2.RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value="random")` draws one, for
        the whole batch at once on the generator's device (nothing is read back to the host).

        Per image: up to 10 attempts of an area ~ U(scale) * H * W and an aspect ratio
        exp(U(log ratio)), giving h = round(sqrt(area * ratio)), w = round(sqrt(area / ratio));
        the first attempt with h < H and w < W is placed at i ~ U{0..H-h}, j ~ U{0..W-w}. An image
        erases nothing (apply False, box 0, 0, 0, 0) if its coin says no or no attempt fits."""
        dev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand((2, batch, ERASING_ATTEMPTS), generator=generator, device=dev)
        area = height * width * (ERASING_SCALE[0] + (ERASING_SCALE[1] - ERASING_SCALE[0]) * u[0])
        log_lo, log_hi = math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
        h = torch.sqrt(area * aspect).round().long()  # round half to even, as Python's round
        w = torch.sqrt(area / aspect).round().long()
        fits = (h < height) & (w < width)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first attempt that fits
        h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
        coin = torch.rand(batch, generator=generator, device=dev)
        apply = fits.any(1) & (coin < self.p)
        h, w = h * apply, w * apply
        corner = torch.rand((2, batch), generator=generator, device=dev)
        # floor(U * n) is uniform on {0..n-1}; the clamp guards float32 rounding U * n up to n.
        i = torch.minimum((corner[0] * (height - h + 1)).long(), height - h) * apply
        j = torch.minimum((corner[1] * (width - w + 1)).long(), width - w) * apply
        return apply, i, j, h, w
