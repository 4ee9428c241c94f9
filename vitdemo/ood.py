"""Out-of-distribution scores: how unlike the training data an image is.

A classifier always answers with one of its classes, and its softmax is often confident on
pictures it was never meant to see (a text page, a medical scan). The maximum softmax probability
(Hendrycks and Gimpel, 2017, arXiv:1610.02136) is the usual baseline. This module implements the
Mahalanobis score of Lee et al., 2018 (*A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks*, arXiv:1807.03888): one Gaussian per class
with a covariance shared by the classes, fitted to the class-token features of the training
images, and the distance to the nearest class mean as the score.

    stats = fit(model, train_data, val_data, preprocess)       # means, covariance, threshold
    s = scores(model, images, {"ood": stats})                  # (B,), higher = less like training
    for v in check(model, images, metadata): print(v.flagged, v.relative)

The feature is the class token as it enters the final LayerNorm, z_L^0 of the ViT paper's Eq. 4
(`"pre_norm"`), by default. After the LayerNorm (`"post_norm"`, y = LN(z_L^0), what the head
reads) the token's scale is divided out, and with it much of what tells unlike images apart:
on the shipped CIFAR-10 model the AUROC against the images of `unlike_images` is 0.95 after the
LayerNorm and above 0.99 before it (`python benchmarks/ood.py`).

Means and covariance come from training images; the threshold from held-out images of the same
distribution. A model that fits its training set well puts training features much closer to the
class means than unseen ones, so a threshold taken from training images flags far more unseen
in-distribution images than it promises.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from .data import ImageData, Preprocessing, iterate_batches, normalize
from .explanations import min_max

METHOD = "mahalanobis-shared-covariance"
FEATURES = {"pre_norm": "class token entering the final LayerNorm (z_L^0)",
            "post_norm": "class token after the final LayerNorm (what the head reads)"}
RTOL = 1e-10  # covariance directions with less variance than this share of the largest are dropped


class OODUnavailable(ValueError):
    """The model's metadata holds no (or unusable) out-of-distribution statistics."""


@dataclass(frozen=True)
class Verdict:
    """One image's out-of-distribution score against the model's threshold."""

    score: float  # Mahalanobis distance to the nearest class mean
    threshold: float  # at most `false_alarm_rate` of held-out training-distribution images score above it

    @property
    def flagged(self) -> bool:
        """True when the image is unlike the training data (its score is above the threshold)."""
        return self.score > self.threshold

    @property
    def relative(self) -> float:
        """The score as a multiple of the threshold: above 1 is flagged."""
        return self.score / self.threshold if self.threshold > 0 else math.inf


# ---------------------------------------------------------------------------------------------
# Features and scores
# ---------------------------------------------------------------------------------------------


def features(model: nn.Module, images: Tensor, feature: str = "pre_norm") -> Tensor:
    """Class-token features (B, D), fp32, of a normalised batch, in eval mode (dropout would add
    noise): `"pre_norm"` entering the final LayerNorm, `"post_norm"` after it."""
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {sorted(FEATURES)}, got {feature!r}")
    captured = {}
    owner = threading.get_ident()

    def capture(_: nn.Module, inputs: tuple, __: object) -> None:
        if threading.get_ident() == owner:  # not the pass another thread runs on the same (shared) model
            captured["pre_norm"] = inputs[0][:, 0]

    # The token entering the LayerNorm is not returned by forward_features: read it with a hook.
    hook = model.norm.register_forward_hook(capture)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tokens, _ = model.forward_features(images.to(next(model.parameters()).device))
    finally:
        hook.remove()
        model.train(was_training)
    return (captured["pre_norm"] if feature == "pre_norm" else tokens[:, 0]).float()


def _data_features(model: nn.Module, data: ImageData, mean, std, feature: str, batch_size: int = 256) -> Tensor:
    device = next(model.parameters()).device
    parts = [features(model, normalize(x.to(device), mean, std), feature).cpu()
             for x, _ in iterate_batches(data, batch_size, shuffle=False)]
    return torch.cat(parts) if parts else torch.empty(0, model.config.embed_dim)


def _stats(metadata: dict[str, Any], width: int) -> tuple[Tensor, Tensor, str]:
    ood = metadata.get("ood") if isinstance(metadata, dict) else None
    if not isinstance(ood, dict) or not {"means", "whitening", "threshold"} <= ood.keys():
        raise OODUnavailable(
            "this model has no out-of-distribution statistics; fit them with "
            "`python -m vitdemo fit-ood --checkpoint CHECKPOINT --data DATA`")
    # float32, as fit() rounded them and calibrated the threshold with them
    means = torch.tensor(ood["means"], dtype=torch.float32)
    whitening = torch.tensor(ood["whitening"], dtype=torch.float32)
    feature = ood.get("feature", "pre_norm")
    if (means.ndim != 2 or means.shape[1] != width or whitening.ndim != 2 or whitening.shape[0] != width
            or feature not in FEATURES):
        raise OODUnavailable(f"the out-of-distribution statistics do not fit this model (width {width}): "
                             f"means {tuple(means.shape)}, whitening {tuple(whitening.shape)}, feature "
                             f"{feature!r}; fit them again")
    return means, whitening, feature


def distances(feats: Tensor, means: Tensor, whitening: Tensor) -> Tensor:
    """Mahalanobis distance of each feature (B, D) to the nearest of the class means (C, D):
    sqrt(min_c (f - mu_c)^T Sigma^-1 (f - mu_c)), the negative of Lee et al.'s confidence score
    M(x) (their Eq. 2) under a square root, so that it reads in standard deviations. The shared
    precision Sigma^-1 is given as its factor W (D, r), Sigma^-1 = W W^T, so the squared distance
    is |(f - mu_c) W|^2: never negative, and exact whatever the spread of the variances."""
    diff = feats.double()[:, None, :] - means.double()[None]  # (B, C, D)
    squared = (diff @ whitening.double()).square().sum(-1)  # (B, C)
    return squared.min(dim=1).values.sqrt().float()


def scores(model: nn.Module, images: Tensor, metadata: dict[str, Any]) -> Tensor:
    """Out-of-distribution scores (B,) of a normalised batch (B, 3, H, W), as the model expects it
    (see `vitdemo.data.preprocess`): higher means less like the training data; above
    `metadata["ood"]["threshold"]` means flagged. Raises `OODUnavailable` when the metadata holds
    no statistics for this model."""
    from .checkpoint import unwrap

    base = unwrap(model)
    means, whitening, feature = _stats(metadata, base.config.embed_dim)
    return distances(features(base, images, feature).cpu(), means, whitening)


def has_stats(metadata: dict[str, Any]) -> bool:
    """Whether the metadata carries out-of-distribution statistics (`metadata["ood"]`)."""
    return isinstance(metadata.get("ood"), dict) and "threshold" in metadata["ood"]


def check(model: nn.Module, images: Tensor, metadata: dict[str, Any]) -> list[Verdict]:
    """A `Verdict` (score, threshold, flagged, relative) for each image of a normalised batch."""
    values = scores(model, images, metadata)  # raises OODUnavailable without statistics
    threshold = float(metadata["ood"]["threshold"])
    return [Verdict(s, threshold) for s in values.tolist()]


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


def _as_float32_lists(t: Tensor) -> list:
    """Values rounded to float32 and written in their shortest exact form: the JSON stays about
    half the size of float64 reprs, and reading it back gives the same float32 values."""
    return [[float(str(v)) for v in row] for row in t.to(torch.float32).numpy()]


def fit_gaussians(feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Class means (C, D) of the classes present in `labels`, and the factor W (D, r) of the
    inverse of their shared covariance: Lee et al.'s Eq. 1, mu_c the mean feature of class c,
    Sigma the mean of (f - mu_c)(f - mu_c)^T over all images."""
    feats = feats.double()
    present = labels.unique(sorted=True)  # a class without images has no mean
    means = torch.stack([feats[labels == c].mean(0) for c in present.tolist()])
    centred = feats - means[torch.searchsorted(present, labels)]
    covariance = centred.T @ centred / len(feats)
    # Sigma^-1 = V diag(1 / lambda) V^T, kept as W = V diag(lambda^-1/2): rounding W to float32
    # changes each direction by 1e-7 of itself, where rounding Sigma^-1 would swamp the directions
    # of large variance with those of small variance. After the final LayerNorm every feature lies
    # in a hyperplane (its normalised values sum to zero), so one variance is zero but for rounding
    # (about 1e-14 of the largest): as a pseudo-inverse would (Lee et al.'s code uses
    # scikit-learn's), directions under RTOL of the largest variance are dropped.
    variances, directions = torch.linalg.eigh(covariance)
    keep = variances > RTOL * variances.max()
    return means, directions[:, keep] / variances[keep].sqrt()


def calibrate(held_out_scores: Tensor, false_alarm_rate: float) -> float:
    """The threshold above which at most `false_alarm_rate` of `held_out_scores` lie: with
    k = floor(rate * n), halfway between the k+1-th and the k-th highest score, so that exactly k
    are above it (fewer on ties) and rounding noise in a recomputed score does not move an image
    across it."""
    if not 0 <= false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate must be in [0, 1), got {false_alarm_rate}")
    ordered = held_out_scores.double().sort(descending=True).values
    allowed = math.floor(false_alarm_rate * len(ordered) + 1e-9)  # 1e-9: 0.05 * 5000 is 250, not 249.99
    if allowed == 0:
        return float(ordered[0]) * (1 + 1e-6)
    return float((ordered[allowed] + ordered[allowed - 1]) / 2)


def fit(
    model: nn.Module,
    train_data: ImageData,
    val_data: ImageData,
    preprocess: Preprocessing,
    false_alarm_rate: float = 0.05,
    feature: str = "pre_norm",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Fit the statistics of `scores` and return them, JSON-able, for `metadata["ood"]`.

    Class means and the shared covariance come from `train_data` (see `fit_gaussians`); the
    threshold is calibrated on `val_data`, held-out images the model was not trained on, so that
    at most `false_alarm_rate` of them are flagged. `preprocess` (the model's `Preprocessing`) gives
    the normalisation; `feature` is `"pre_norm"` or `"post_norm"`
    (see `features`).
    """
    from .checkpoint import unwrap

    base = unwrap(model)
    if val_data is None or len(val_data) == 0:
        raise ValueError("fitting out-of-distribution statistics needs held-out images (a validation split)")
    if len(train_data) == 0:
        raise ValueError("fitting out-of-distribution statistics needs training images")
    mean, std = preprocess.mean, preprocess.std
    means, whitening = fit_gaussians(_data_features(base, train_data, mean, std, feature, batch_size),
                                     train_data.labels)
    stats = {"method": METHOD, "feature": feature, "feature_description": FEATURES[feature],
             "means": _as_float32_lists(means), "whitening": _as_float32_lists(whitening)}
    # Calibrate with the statistics exactly as they will be read back (float32 values).
    held_out = distances(_data_features(base, val_data, mean, std, feature, batch_size),
                         *_stats({"ood": {**stats, "threshold": 0.0}}, base.config.embed_dim)[:2])
    threshold = calibrate(held_out, false_alarm_rate)
    stats.update(
        threshold=threshold,
        false_alarm_rate=float(false_alarm_rate),
        calibration={"train_images": len(train_data), "held_out_images": len(val_data),
                     "held_out_flagged": float((held_out > threshold).double().mean())},
    )
    return stats


def auroc(inside: Tensor, outside: Tensor) -> float:
    """Area under the ROC curve of telling `outside` from `inside` by score (higher = outside):
    the probability that an outside image scores above an inside one, ties counting half
    (the Mann-Whitney U statistic over the product of the sizes)."""
    values = torch.cat([inside.double(), outside.double()])
    # Ranks 1..n in sorted order, tied values sharing the mean of their ranks.
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # the highest rank of each distinct value
    ranks = (last - (counts.double() - 1) / 2)[inverse]
    n_in, n_out = len(inside), len(outside)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


# ---------------------------------------------------------------------------------------------
# Images unlike natural photos, for tests and benchmarks
# ---------------------------------------------------------------------------------------------

UNLIKE_KINDS = ("noise", "flat", "gradient", "text", "stripes", "checkerboard", "shapes")


def unlike_image(kind: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """One synthetic picture of `kind` (see `UNLIKE_KINDS`), nothing like a CIFAR-10 photo:
    pixel noise, a flat colour, a colour gradient, a page of text, stripes, a checkerboard, or
    flat shapes drawn on a plain background."""
    colour = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
    if kind == "noise":  # uniform RGB noise, grains of 1 to 8 pixels
        grain = int(rng.integers(1, 9))
        pixels = rng.integers(0, 256, (-(-size // grain), -(-size // grain), 3), dtype=np.uint8)
        return Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
    if kind == "flat":
        return Image.new("RGB", (size, size), colour())
    if kind == "gradient":
        y, x = np.indices((size, size)) / (size - 1)
        angle = rng.uniform(0, 2 * np.pi)
        u = np.cos(angle) * x + np.sin(angle) * y
        u = min_max(u)[..., None]  # 0 to 1 along a random direction
        a, b = np.array(colour(), float), np.array(colour(), float)
        return Image.fromarray(np.rint(a * (1 - u) + b * u).astype(np.uint8))
    if kind == "text":
        ink, paper = (int(rng.integers(0, 60)),) * 3, (int(rng.integers(220, 256)),) * 3
        image = Image.new("RGB", (size, size), paper)
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=float(rng.integers(8, 14)))
        words = ["the", "vision", "transformer", "image", "patch", "token", "attention", "layer", "of", "and"]
        y = int(rng.integers(0, 6))
        while y < size:
            draw.text((int(rng.integers(2, 8)), y), " ".join(rng.choice(words, 8)), fill=ink, font=font)
            y += int(font.size * 1.4)
        return image
    if kind in ("stripes", "checkerboard"):
        period = int(rng.integers(4, 24))
        i, j = np.indices((size, size))
        if kind == "stripes":
            angle = rng.uniform(0, np.pi)
            mask = (np.floor((i * np.cos(angle) + j * np.sin(angle)) / period) % 2).astype(bool)
        else:
            mask = ((i // period + j // period) % 2).astype(bool)
        pixels = np.where(mask[..., None], np.array(colour(), np.uint8), np.array(colour(), np.uint8))
        return Image.fromarray(pixels.astype(np.uint8))
    if kind == "shapes":
        image = Image.new("RGB", (size, size), colour())
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = (int(v) for v in rng.integers(0, size * 2 // 3, 2))
            w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
            shape = rng.choice(["ellipse", "rectangle", "polygon"])
            if shape == "polygon":
                draw.polygon([(x0, y0 + h), (x0 + w // 2, y0), (x0 + w, y0 + h)], fill=colour())
            else:
                getattr(draw, str(shape))((x0, y0, x0 + w, y0 + h), fill=colour())
        return image
    raise ValueError(f"unknown kind {kind!r}; one of {UNLIKE_KINDS}")


def unlike_images(per_kind: int, size: int = 96, seed: int = 0) -> dict[str, list[Image.Image]]:
    """`per_kind` pictures of every kind in `UNLIKE_KINDS`, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return {kind: [unlike_image(kind, rng, size) for _ in range(per_kind)] for kind in UNLIKE_KINDS}


__all__ = ["FEATURES", "OODUnavailable", "UNLIKE_KINDS", "Verdict", "auroc", "calibrate", "check", "distances",
           "features", "fit", "fit_gaussians", "has_stats", "scores", "unlike_image", "unlike_images"]
