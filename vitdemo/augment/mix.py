"""Mixup and CutMix of a batch with itself reversed, with label-smoothed soft targets, and the
loss for those targets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing: `lam` is the weight of each image itself (1.0: not mixed), `box` the
    CutMix box (top, bottom, left, right) pasted from the paired image, None for mixup."""

    lam: float
    cutmix: bool = False
    box: tuple[int, int, int, int] | None = None


class MixUpCutMix:
    """Mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization", arXiv 1710.09412)
    or CutMix (Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers with
    Localizable Features", arXiv 1905.04899), one of them per batch as in DeiT and timm's `Mixup`
    (mode "batch"), with label-smoothed targets (Szegedy et al. 2016, "Rethinking the Inception
    Architecture for Computer Vision", section 7).

    Per batch: with probability `prob` mix, else only smooth the targets. CutMix is chosen with
    probability `switch_prob` when both alphas are > 0, else the one whose alpha is > 0.
    lam ~ Beta(alpha, alpha). Image k is mixed with image B-1-k (the batch reversed, as timm):
    with repeated augmentation the copies of an image may sit side by side, and pairing
    neighbours (a roll by one) would often mix an image with itself.

      mixup:  x' = lam * x + (1 - lam) * x.flip(0)
      CutMix: x' = x with a box of x.flip(0) pasted in, lam = 1 - box area / image area
      both:   y' = lam * smooth(y) + (1 - lam) * smooth(y.flip(0)),
              smooth(y) = one_hot(y) * (1 - label_smoothing) + label_smoothing / num_classes

    Every draw comes from a numpy Generator on the host, so nothing waits for the GPU.
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.1) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not (math.isfinite(alpha) and alpha >= 0):
                raise ValueError(f"{name} must be a number >= 0 (0 turns it off), got {alpha}")
        for name, p in (("switch_prob", switch_prob), ("prob", prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {p}")
        if mixup_alpha == 0 and cutmix_alpha == 0 and prob > 0:
            raise ValueError("mixup_alpha and cutmix_alpha are both 0: set one of them > 0, or prob=0 for "
                             "label smoothing alone")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, float(mixup_alpha), float(cutmix_alpha)
        self.switch_prob, self.prob, self.label_smoothing = float(switch_prob), float(prob), float(label_smoothing)

    def __repr__(self) -> str:
        return (f"MixUpCutMix(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_alpha={self.cutmix_alpha}, switch_prob={self.switch_prob}, prob={self.prob}, "
                f"label_smoothing={self.label_smoothing})")

    def __call__(self, x: Tensor, labels: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """Float images (B, C, H, W) and int64 labels (B,) -> (mixed images, float32 targets
        (B, num_classes)), with this batch's `draw` from `rng`. `x` itself is left as it is."""
        if not x.is_floating_point() or x.ndim != 4:
            raise ValueError(f"expected a float batch (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
        return self.mix(x, labels, self.draw(x.shape[-2], x.shape[-1], rng))

    def draw(self, height: int, width: int, rng: np.random.Generator) -> MixDraw:
        """One batch's random choices, in the order of timm's `Mixup._params_per_batch`."""
        if not rng.random() < self.prob:
            return MixDraw(1.0)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = bool(rng.random() < self.switch_prob)
        else:
            cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not cutmix:
            return MixDraw(lam)
        # timm's `rand_bbox`: a box of sides H * sqrt(1 - lam), W * sqrt(1 - lam) (its area is
        # (1 - lam) of the image), centred anywhere in the image and clipped to it; lam is then
        # corrected to the area actually pasted.
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        return MixDraw(lam, cutmix=True, box=(top, bottom, left, right))

    def mix(self, x: Tensor, labels: Tensor, draw: MixDraw) -> tuple[Tensor, Tensor]:
        """Apply one `draw` to a batch: (mixed images, float32 targets (B, num_classes))."""
        if labels.dtype != torch.int64 or labels.shape != (x.shape[0],):
            raise ValueError(f"labels must be int64 (B,) with B = {x.shape[0]}, got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if labels.device.type == "cpu" and labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < \
                self.num_classes:  # (not checked on a GPU, where it would wait for the GPU)
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {int(labels.min())}..{int(labels.max())}")
        s = self.label_smoothing
        smooth = torch.full((len(labels), self.num_classes), s / self.num_classes, device=labels.device)
        smooth.scatter_(1, labels[:, None], 1.0 - s + s / self.num_classes)
        if draw.lam == 1.0:
            return x, smooth
        targets = smooth.mul(draw.lam).add_(smooth.flip(0), alpha=1.0 - draw.lam)
        if draw.cutmix:
            top, bottom, left, right = draw.box
            x = x.clone()
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        else:
            x = x.mul(draw.lam).add_(x.flip(0), alpha=1.0 - draw.lam)
        return x, targets


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy with soft targets: mean over the batch of sum_c -targets_c * log_softmax(logits)_c.
    With label-smoothed one-hot targets it equals F.cross_entropy(..., label_smoothing=s)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
