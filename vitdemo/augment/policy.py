"""RandAugment and AutoAugment drawn per image but applied once per operation."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

from . import _torchvision as tv

POLICIES = ("randaugment", "autoaugment")

Draw = tuple[str, float]  # (operation name, signed magnitude) of one policy operation on one image
Rounds = list[list[Draw | None]]  # per round (operation slot), per image: its draw, or None to skip


def check_host_generator(host_generator: torch.Generator | None) -> None:
    if host_generator is not None and host_generator.device.type != "cpu":
        raise ValueError(f"host_generator must be a CPU torch.Generator, got one on {host_generator.device}")


class AugmentPolicy:
    """An AutoAugment-family policy on uint8 batches, with torchvision's operations.

      - "randaugment": RandAugment (Cubuk et al. 2020, "RandAugment: Practical automated data
        augmentation with a reduced search space", arXiv 1909.13719), torchvision's defaults:
        2 operations, each chosen uniformly out of 14, magnitude 9 (as DeiT).
      - "autoaugment": AutoAugment's CIFAR-10 policy (Cubuk et al. 2019, "AutoAugment: Learning
        Augmentation Strategies from Data", arXiv 1805.09501): one of 25 sub-policies of two
        operations, each applied with its own probability and magnitude.

    The choices are drawn per image (`draws`), with the distribution that `forward` of the
    torchvision transform (`transform`) has for one image, and on the host: they decide which code
    runs, and reading them back from a GPU would wait for it every batch.
    """

    def __init__(self, name: str) -> None:
        if name == "randaugment":
            self.transform: tv.PolicyTransform = v2.RandAugment()
        elif name == "autoaugment":
            self.transform = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
        else:
            raise ValueError(f"policy must be None or one of {', '.join(map(repr, POLICIES))}, got {name!r}")
        self.name = name

    def __call__(self, x: Tensor, host_generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, C, H, W) -> the batch with each image's draws applied."""
        return self.apply(x, self.draws(x, host_generator))

    def draws(self, x: Tensor, host_generator: torch.Generator | None = None) -> Rounds:
        """The random choices for the batch `x` (only its shape is read): for each round, an
        (operation, signed magnitude) per image, or None where the image skips that operation;
        from `host_generator` (a CPU generator; None: the global RNG)."""
        check_host_generator(host_generator)
        b, _, h, w = x.shape
        if self.name == "randaugment":
            return randaugment_draws(self.transform, b, h, w, host_generator)
        return autoaugment_draws(self.transform, b, h, w, host_generator)

    def apply(self, x: Tensor, rounds: Rounds) -> Tensor:
        """Apply the draws round by round, each distinct (operation, magnitude) of a round once on
        all the images that drew it. torchvision's operations treat the images of a batch
        independently, so every image gets exactly what the transform gives it for the same
        draws, in a few dozen calls per round instead of one per image (fewer kernel launches on a
        GPU, less Python on a CPU)."""
        for draws in rounds:
            groups: dict[Draw, list[int]] = {}
            for i, draw in enumerate(draws):
                if draw is not None:
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
                out[idx] = tv.apply_operation(self.transform, x[idx], name, magnitude)
            x = out
        return x


def randaugment_draws(ra: v2.RandAugment, b: int, h: int, w: int, g: torch.Generator | None) -> Rounds:
    """RandAugment for b images of h x w: every round picks one of the operations uniformly, at
    the fixed magnitude, negated with probability 1/2 for the signed ones. From `g`, per round:
    one randint (b,) for the operations, one rand (b,) for the signs."""
    choices = []  # (operation, magnitude at this image size, signed?)
    for name, (magnitudes_fn, signed) in tv.augmentation_space(ra).items():
        magnitudes = magnitudes_fn(ra.num_magnitude_bins, h, w)
        choices.append((name, 0.0 if magnitudes is None else float(magnitudes[ra.magnitude]), signed))
    rounds = []
    for _ in range(ra.num_ops):
        ops = torch.randint(len(choices), (b,), generator=g).tolist()
        negative = (torch.rand(b, generator=g) <= 0.5).tolist()
        rounds.append([(choices[op][0], -choices[op][1] if choices[op][2] and neg else choices[op][1])
                       for op, neg in zip(ops, negative)])
    return rounds


def autoaugment_draws(aa: v2.AutoAugment, b: int, h: int, w: int, g: torch.Generator | None) -> Rounds:
    """AutoAugment for b images of h x w: one sub-policy per image, chosen uniformly; each of its
    two operations is applied if U <= its probability, at its magnitude out of 10 bins, negated
    if U <= 1/2 for the signed ones (`v2.AutoAugment.forward`, for all images at once)."""
    table = []  # per sub-policy, per slot: (operation, magnitude, signed?, probability)
    for subpolicy in tv.subpolicies(aa):
        slots = []
        for name, probability, magnitude_idx in subpolicy:
            magnitudes_fn, signed = tv.augmentation_space(aa)[name]
            magnitudes = magnitudes_fn(10, h, w)
            magnitude = 0.0 if magnitudes is None else float(magnitudes[magnitude_idx])
            slots.append((name, magnitude, signed and magnitudes is not None, probability))
        table.append(slots)
    index = torch.randint(len(table), (b,), generator=g).tolist()
    applied = torch.rand((b, 2), generator=g).tolist()
    negative = (torch.rand((b, 2), generator=g) <= 0.5).tolist()
    rounds: Rounds = [[], []]
    for k, s in enumerate(index):
        for r, (name, magnitude, signed, probability) in enumerate(table[s]):
            if applied[k][r] <= probability:
                rounds[r].append((name, -magnitude if signed and negative[k][r] else magnitude))
            else:
                rounds[r].append(None)
    return rounds
