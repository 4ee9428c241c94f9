"""Augmentation and regularisation for training small ViTs, on whole batches.

A ViT has none of a CNN's built-in locality, so on a small data set it overfits unless the data are
varied for it: DeiT (Touvron et al. 2021, "Training data-efficient image transformers & distillation
through attention", arXiv 2012.12877) trains ViT-B on ImageNet-1k alone with RandAugment, random
erasing (p 0.25), mixup (alpha 0.8) and CutMix (alpha 1.0) switched per batch with probability 0.5,
and label smoothing 0.1, and each of them helps.

Everything here works on a whole batch (B, 3, H, W) at once, on the CPU or a GPU, in few calls:

- `BatchAugment`: per-image random crop and flip (one gather), an AutoAugment or RandAugment
  policy drawn per image but applied once per operation, `normalize`, then random erasing.
- `MixUpCutMix`: mixup or CutMix of the batch with itself reversed, and the soft targets.
- `soft_cross_entropy`: the loss for those targets.

Randomness comes only from the generators passed in, never from the global RNG when one is given,
so a seed gives the same batches. Draws that decide which code runs (a policy's operations, the
mixing mode and box) are made on the host, so they never make the CPU wait for the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from .data import normalize

POLICIES = ("randaugment", "autoaugment")
ERASING_SCALE = (0.02, 0.33)  # erased share of the image (Zhong et al.; torchvision's and timm's default)
ERASING_RATIO = (0.3, 3.3)  # aspect ratio h / w of the erased box, drawn log-uniformly
ERASING_ATTEMPTS = 10  # boxes drawn per image before giving up, as torchvision

Draw = tuple[str, float]  # (operation name, signed magnitude) of one policy operation on one image


def _policy_transform(policy: str | None) -> v2.RandAugment | v2.AutoAugment | None:
    if policy is None:
        return None
    if policy == "randaugment":
        return v2.RandAugment()  # 2 operations of magnitude 9 out of 31 bins, as DeiT
    if policy == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    raise ValueError(f"policy must be None or one of {', '.join(map(repr, POLICIES))}, got {policy!r}")


def _check_host(host_generator: torch.Generator | None) -> None:
    if host_generator is not None and host_generator.device.type != "cpu":
        raise ValueError(f"host_generator must be a CPU torch.Generator, got one on {host_generator.device}")


class BatchAugment:
    """Training augmentation of a uint8 batch, in DeiT's order: random crop from the padded image
    and horizontal flip, an optional policy (on uint8), `normalize`, optional random erasing (on
    the normalised values, so that its noise has the data's scale).

    Policies:
      - "randaugment": RandAugment (Cubuk et al. 2020, "RandAugment: Practical automated data
        augmentation with a reduced search space", arXiv 1909.13719), torchvision's defaults:
        2 operations, each chosen uniformly out of 14, magnitude 9.
      - "autoaugment": AutoAugment's CIFAR-10 policy (Cubuk et al. 2019, "AutoAugment: Learning
        Augmentation Strategies from Data", arXiv 1805.09501): one of 25 sub-policies of two
        operations, each applied with its own probability and magnitude.

    Random erasing (Zhong et al. 2020, "Random Erasing Data Augmentation", arXiv 1708.04896)
    replaces, with probability `erasing`, one box per image by standard normal noise, drawn as
    `v2.RandomErasing(erasing, value="random")` draws it (`erasing_draws`).

    Call with a `torch.Generator` for reproducible batches (without one the global RNG is used).
    Crop, flip and erasing draw on the generator's device. A policy's draws decide which operation
    runs on which images, so they are read on the host: they come from `host_generator` (a CPU
    generator) if given, else from `generator` if it is a CPU one; a CUDA generator needs a
    `host_generator` beside it.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_padding: int | None = 4,
        flip: bool = True,
        policy: str | None = None,
        erasing: float = 0.0,
        padding_mode: str = "constant",
    ) -> None:
        if padding_mode not in ("constant", "reflect"):
            raise ValueError(f"padding_mode must be 'constant' or 'reflect', got {padding_mode!r}")
        if not 0.0 <= erasing <= 1.0:
            raise ValueError(f"erasing is a probability in [0, 1], got {erasing}")
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.crop_padding, self.flip, self.padding_mode = crop_padding, flip, padding_mode
        self.policy, self.policy_transform = policy, _policy_transform(policy)
        self.erasing = float(erasing)

    def __repr__(self) -> str:
        return (f"BatchAugment(image_size={self.image_size}, crop_padding={self.crop_padding}, flip={self.flip}, "
                f"policy={self.policy!r}, erasing={self.erasing}, padding_mode={self.padding_mode!r})")

    def __call__(self, images_uint8: Tensor, generator: torch.Generator | None = None,
                 host_generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, 3, H, W) -> augmented, normalised float32 (B, 3, image_size, image_size)."""
        x = images_uint8
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"expected a uint8 batch (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        h, w = x.shape[-2:]
        s, pad = self.image_size, self.crop_padding or 0
        if min(h, w) + 2 * pad < s:
            raise ValueError(f"images {h}x{w} padded by {pad} are smaller than image_size {s}")
        _check_host(host_generator)
        if self.policy is not None and host_generator is None:
            if generator is not None and generator.device.type != "cpu":
                # Reading draws made on the GPU back to the host would wait for the GPU every batch.
                raise ValueError(f"the {self.policy} policy draws its operations on the host: with a generator on "
                                 f"{generator.device}, also pass host_generator=torch.Generator() (a CPU generator)")
            host_generator = generator
        if pad or h != s or w != s or self.flip:
            x = self._crop_flip(x, s, pad, generator)
        if self.policy is not None:
            x = self._apply_policy(x, host_generator)
        x = normalize(x, self.mean, self.std)
        if self.erasing > 0:
            x = self._erase(x, generator)
        return x

    # -- crop and flip ------------------------------------------------------------------------

    def _crop_flip(self, x: Tensor, s: int, pad: int, generator: torch.Generator | None) -> Tensor:
        b, c, h, w = x.shape
        # Random draws happen where the generator lives (CPU or GPU), whatever device the batch is on.
        dev = generator.device if generator is not None else torch.device("cpu")
        # Offsets into the (virtually) padded image.
        top = torch.randint(0, h + 2 * pad - s + 1, (b, 1), generator=generator, device=dev) - pad
        left = torch.randint(0, w + 2 * pad - s + 1, (b, 1), generator=generator, device=dev) - pad
        rows = top + torch.arange(s, device=dev)  # (b, s) source row of every output row
        cols = left + torch.arange(s, device=dev)
        if self.flip:
            flipped = torch.rand((b, 1), generator=generator, device=dev) < 0.5
            cols = torch.where(flipped, cols.flip(1), cols)
        # Padding without materialising it: map outside indices back inside (reflect) or to zero.
        inside = (rows >= 0) & (rows < h)
        inside = inside[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (b, s, s)
        if self.padding_mode == "reflect":
            rows, cols = _reflect(rows, h), _reflect(cols, w)
        rows, cols = rows.clamp(0, h - 1).to(x.device), cols.clamp(0, w - 1).to(x.device)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        out = x[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
        if self.padding_mode == "constant" and pad:
            out = out * inside[:, None].to(x.device)
        return out

    # -- AutoAugment / RandAugment ------------------------------------------------------------

    def _apply_policy(self, x: Tensor, host_generator: torch.Generator | None) -> Tensor:
        """The policy drawn per image (`policy_draws`) but applied per operation: each distinct
        (operation, magnitude) of a round runs once on all the images that drew it. torchvision's
        operations treat the images of a batch independently, so every image gets exactly what
        the torchvision transform gives it for the same draws, in a few dozen calls per round
        instead of one per image (fewer kernel launches on a GPU, less Python on a CPU)."""
        t = self.policy_transform
        for draws in self.policy_draws(x, host_generator):
            groups: dict[Draw, list[int]] = {}
            for i, draw in enumerate(draws):
                if draw is not None:  # None: this image skips the operation
                    groups.setdefault(draw, []).append(i)
            if not groups:
                continue
            # Every group's image indices in one transfer (from pinned memory, so a GPU does not
            # have to finish its queued work first), sliced per group there.
            flat = torch.tensor([i for members in groups.values() for i in members])
            if x.device.type == "cuda":
                flat = flat.pin_memory()
            flat = flat.to(x.device, non_blocking=True)
            out, start = x.clone(), 0
            for (name, magnitude), members in groups.items():
                idx = flat[start:start + len(members)]
                start += len(members)
                out[idx] = t._apply_image_or_video_transform(x[idx], name, magnitude,
                                                             interpolation=t.interpolation, fill=t._fill)
            x = out
        return x

    def policy_draws(self, x: Tensor, host_generator: torch.Generator | None = None) -> list[list[Draw | None]]:
        """The policy's random choices for the batch `x` (only its shape is read): for each round
        (operation slot), an (operation, signed magnitude) per image, or None where the image skips
        that operation. Drawn per image with the distribution of `v2.RandAugment.forward` or
        `v2.AutoAugment.forward` for one image, from `host_generator` (None: the global RNG)."""
        if self.policy is None:
            return []
        _check_host(host_generator)
        b, _, h, w = x.shape
        if self.policy == "randaugment":
            return self._randaugment_draws(b, h, w, host_generator)
        return self._autoaugment_draws(b, h, w, host_generator)

    def _randaugment_draws(self, b: int, h: int, w: int, g: torch.Generator | None) -> list[list[Draw | None]]:
        # RandAugment: every round picks one of the 14 operations uniformly, at the fixed
        # magnitude, negated with probability 1/2 for the signed ones.
        ra = self.policy_transform
        choices = []  # (operation, magnitude at this image size, signed?)
        for name, (magnitudes_fn, signed) in ra._AUGMENTATION_SPACE.items():
            magnitudes = magnitudes_fn(ra.num_magnitude_bins, h, w)
            choices.append((name, 0.0 if magnitudes is None else float(magnitudes[ra.magnitude]), signed))
        rounds = []
        for _ in range(ra.num_ops):
            ops = torch.randint(len(choices), (b,), generator=g).tolist()
            negative = (torch.rand(b, generator=g) <= 0.5).tolist()
            rounds.append([(choices[op][0], -choices[op][1] if choices[op][2] and neg else choices[op][1])
                           for op, neg in zip(ops, negative)])
        return rounds

    def _autoaugment_draws(self, b: int, h: int, w: int, g: torch.Generator | None) -> list[list[Draw | None]]:
        # AutoAugment: one sub-policy per image, chosen uniformly; each of its two operations is
        # applied if U <= its probability, at its magnitude out of 10 bins, negated if U <= 1/2
        # for the signed ones (torchvision's `AutoAugment.forward`, here for all images at once).
        aa = self.policy_transform
        table = []  # per sub-policy, per slot: (operation, magnitude, signed?, probability)
        for subpolicy in aa._policies:
            slots = []
            for name, probability, magnitude_idx in subpolicy:
                magnitudes_fn, signed = aa._AUGMENTATION_SPACE[name]
                magnitudes = magnitudes_fn(10, h, w)
                magnitude = 0.0 if magnitudes is None else float(magnitudes[magnitude_idx])
                slots.append((name, magnitude, signed and magnitudes is not None, probability))
            table.append(slots)
        index = torch.randint(len(table), (b,), generator=g).tolist()
        applied = torch.rand((b, 2), generator=g).tolist()
        negative = (torch.rand((b, 2), generator=g) <= 0.5).tolist()
        rounds: list[list[Draw | None]] = [[], []]
        for k, s in enumerate(index):
            for r, (name, magnitude, signed, probability) in enumerate(table[s]):
                if applied[k][r] <= probability:
                    rounds[r].append((name, -magnitude if signed and negative[k][r] else magnitude))
                else:
                    rounds[r].append(None)
        return rounds

    # -- random erasing -----------------------------------------------------------------------

    def erasing_draws(self, batch: int, height: int, width: int,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(apply bool (B,), i, j, h, w long (B,)): the box each image erases, drawn as
        `v2.RandomErasing(p=erasing, scale=(0.02, 0.33), ratio=(0.3, 3.3), value="random")` draws one,
        for the whole batch at once on the generator's device (nothing is read back to the host).

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
        apply = fits.any(1) & (coin < self.erasing)
        h, w = h * apply, w * apply
        corner = torch.rand((2, batch), generator=generator, device=dev)
        # floor(U * n) is uniform on {0..n-1}; the clamp guards float32 rounding U * n up to n.
        i = torch.minimum((corner[0] * (height - h + 1)).long(), height - h) * apply
        j = torch.minimum((corner[1] * (width - w + 1)).long(), width - w) * apply
        return apply, i, j, h, w

    def _erase(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        b, c, height, width = x.shape
        dev = generator.device if generator is not None else torch.device("cpu")
        _, i, j, h, w = (t.to(x.device) for t in self.erasing_draws(b, height, width, generator))
        # Per-pixel noise (torchvision's value="random", timm's mode "pixel"), drawn for the whole
        # batch so that the boxes never have to be read back to the host.
        noise = torch.randn((b, c, height, width), generator=generator, device=dev).to(x.device)
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        in_rows = (rows >= i[:, None]) & (rows < (i + h)[:, None])  # (B, H); empty where not applied
        in_cols = (cols >= j[:, None]) & (cols < (j + w)[:, None])
        box = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        return torch.where(box, noise.to(x.dtype), x)


def _reflect(index: Tensor, size: int) -> Tensor:
    """Reflect-pad indices (without repeating the edge pixel), as F.pad(mode='reflect')."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


# ---------------------------------------------------------------------------------------------
# Mixup and CutMix
# ---------------------------------------------------------------------------------------------


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


__all__ = ["ERASING_RATIO", "ERASING_SCALE", "POLICIES", "BatchAugment", "MixDraw", "MixUpCutMix",
           "soft_cross_entropy"]
