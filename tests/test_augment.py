"""Batch augmentation (crop, flip, RandAugment / AutoAugment, random erasing), mixup / CutMix and
the soft-target loss, each checked against torchvision's or timm's own implementation."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import mixup as timm_mixup
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vitdemo.augment import (ERASING_RATIO, ERASING_SCALE, AugmentPolicy, BatchAugment, MixDraw, MixUpCutMix,
                             RandomCropFlip, RandomErasing, soft_cross_entropy)
from vitdemo.augment import _torchvision as tv
from vitdemo.data import CIFAR_MEAN, CIFAR_STD, normalize


def batch(b: int = 16, s: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def shape_only(b: int, s: int) -> torch.Tensor:
    """A batch that only has a shape (the draws read nothing else), without the memory."""
    return torch.zeros(1, 3, s, s, dtype=torch.uint8).expand(b, -1, -1, -1)


def apply_each(transform, x: torch.Tensor, rounds) -> torch.Tensor:
    """torchvision's own operations, image by image, round by round, for the given draws."""
    out = []
    for k, image in enumerate(x):
        for draws in rounds:
            if draws[k] is not None:
                image = tv.apply_operation(transform, image, *draws[k])
        out.append(image)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Crop and flip
# ---------------------------------------------------------------------------------------------


def test_augment_without_crop_or_flip_is_normalize():
    x = batch()
    aug = BatchAugment(8, CIFAR_MEAN, CIFAR_STD, crop_padding=0, flip=False)
    out = aug(x)
    assert out.dtype == torch.float32 and out.shape == (16, 3, 8, 8)
    assert torch.equal(out, normalize(x, CIFAR_MEAN, CIFAR_STD))
    assert torch.equal(BatchAugment(8, CIFAR_MEAN, CIFAR_STD, crop_padding=None, flip=False)(x), out)


def test_augment_flip_mirrors_some_samples():
    x = batch(32)
    out = BatchAugment(8, (0, 0, 0), (1, 1, 1), crop_padding=0, flip=True)(x, torch.Generator().manual_seed(0))
    ref = normalize(x, (0, 0, 0), (1, 1, 1))
    same = (out == ref).flatten(1).all(1)
    mirrored = (out == ref.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_augment_crop_is_a_shifted_window_of_the_padded_image(mode):
    x = batch(32)
    aug = BatchAugment(8, (0, 0, 0), (1, 1, 1), crop_padding=3, flip=False, padding_mode=mode)
    out = aug(x, torch.Generator().manual_seed(0))
    padded = F.pad(x.float() / 255, (3, 3, 3, 3), mode=mode)
    offsets = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(7) for dx in range(7)
                 if torch.allclose(out[i], padded[i, :, dy:dy + 8, dx:dx + 8], atol=1e-6)]
        assert found, f"sample {i} is not a window of its padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 5  # offsets drawn per sample


def test_augment_is_reproducible_with_a_generator_and_crops_larger_images():
    x = batch(8, s=12)
    aug = BatchAugment(8, CIFAR_MEAN, CIFAR_STD, crop_padding=2)
    a = aug(x, torch.Generator().manual_seed(5))
    assert a.shape == (8, 3, 8, 8)
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(6)))
    with pytest.raises(ValueError):
        BatchAugment(32, CIFAR_MEAN, CIFAR_STD, crop_padding=2)(x)
    with pytest.raises(ValueError):
        aug(x.float())


@pytest.mark.parametrize("kwargs", [{"policy": "trivialaugment"}, {"policy": True}, {"erasing": 1.5},
                                    {"erasing": -0.1}, {"padding_mode": "edge"}])
def test_augment_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        BatchAugment(8, CIFAR_MEAN, CIFAR_STD, **kwargs)


# ---------------------------------------------------------------------------------------------
# RandAugment and AutoAugment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["randaugment", "autoaugment"])
def test_policy_runs_reproducibly_and_leaves_the_global_rng_alone(policy):
    x = batch(8, s=16)
    aug = BatchAugment(16, CIFAR_MEAN, CIFAR_STD, policy=policy, erasing=0.5)
    state = torch.get_rng_state()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(2), host_generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(1)))
    assert torch.equal(b, aug(x, torch.Generator().manual_seed(2), host_generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, b)


def test_randaugment_gives_each_image_what_torchvision_gives_it_for_its_draws():
    x = batch(48, s=16)
    aug = BatchAugment(16, CIFAR_MEAN, CIFAR_STD, crop_padding=None, flip=False, policy="randaugment")
    assert isinstance(aug.policy_transform, v2.RandAugment)
    rounds = aug.policy_draws(x, torch.Generator().manual_seed(3))
    assert len(rounds) == 2 and all(len(draws) == 48 for draws in rounds)
    assert all(draw is not None for draws in rounds for draw in draws)  # RandAugment never skips
    ops = {name for draws in rounds for name, _ in draws}
    assert len(ops) >= 10  # drawn per image: 96 draws cover most of the 14 operations
    assert any(m < 0 for draws in rounds for _, m in draws)  # signed operations take both signs
    out = aug.augment_policy(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, apply_each(aug.policy_transform, x, rounds))
    assert torch.equal(aug(x, torch.Generator().manual_seed(3)), normalize(out, CIFAR_MEAN, CIFAR_STD))


def test_randaugment_with_a_cpu_generator_draws_what_it_always_drew():
    # The stream of a CPU generator is pinned: crop and flip, then per round one randint over the
    # 14 operations and one rand per image for the sign, and nothing else (no erasing draws).
    x = batch(24, s=16)
    aug = BatchAugment(16, CIFAR_MEAN, CIFAR_STD, policy="randaugment")
    g = torch.Generator().manual_seed(11)
    out = aug(x, g)
    ref = torch.Generator().manual_seed(11)
    cropped = aug.crop_flip(x, ref)
    ra = v2.RandAugment()
    space = list(tv.augmentation_space(ra).items())
    rounds = []
    for _ in range(2):
        ops = torch.randint(14, (24,), generator=ref).tolist()
        negative = (torch.rand(24, generator=ref) <= 0.5).tolist()
        draws = []
        for op, neg in zip(ops, negative):
            name, (magnitudes_fn, signed) = space[op]
            magnitudes = magnitudes_fn(31, 16, 16)
            magnitude = 0.0 if magnitudes is None else float(magnitudes[9])
            draws.append((name, -magnitude if signed and neg else magnitude))
        rounds.append(draws)
    assert torch.equal(out, normalize(apply_each(ra, cropped, rounds), CIFAR_MEAN, CIFAR_STD))
    assert torch.equal(g.get_state(), ref.get_state())


def test_policy_draws_come_from_the_host_generator_when_given_one():
    x = batch(32, s=16)
    aug = BatchAugment(16, CIFAR_MEAN, CIFAR_STD, policy="autoaugment")
    out = aug(x, torch.Generator().manual_seed(0), host_generator=torch.Generator().manual_seed(9))
    cropped = aug.crop_flip(x, torch.Generator().manual_seed(0))
    expected = aug.augment_policy(cropped, torch.Generator().manual_seed(9))
    assert torch.equal(out, normalize(expected, CIFAR_MEAN, CIFAR_STD))


def test_autoaugment_gives_each_image_what_torchvision_gives_it_for_its_draws():
    x = batch(64, s=16)
    aug = BatchAugment(16, CIFAR_MEAN, CIFAR_STD, crop_padding=None, flip=False, policy="autoaugment")
    assert isinstance(aug.policy_transform, v2.AutoAugment)
    assert aug.policy_transform.policy == v2.AutoAugmentPolicy.CIFAR10
    rounds = aug.policy_draws(x, torch.Generator().manual_seed(4))
    assert len(rounds) == 2 and all(len(draws) == 64 for draws in rounds)
    assert any(d is None for draws in rounds for d in draws)  # operations are skipped with 1 - p
    assert any(d is not None and d[1] < 0 for draws in rounds for d in draws)  # both signs
    out = aug.augment_policy(x, torch.Generator().manual_seed(4))
    assert torch.equal(out, apply_each(aug.policy_transform, x, rounds))
    assert torch.equal(aug(x, torch.Generator().manual_seed(4)), normalize(out, CIFAR_MEAN, CIFAR_STD))


def test_autoaugment_draws_follow_the_cifar10_policy():
    n, size = 20_000, 32
    aug = BatchAugment(size, CIFAR_MEAN, CIFAR_STD, policy="autoaugment")
    rounds = aug.policy_draws(shape_only(n, size), torch.Generator().manual_seed(0))
    # The sub-policies, from torchvision itself: per slot (operation, |magnitude|, signed, p).
    aa = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    table = []
    for subpolicy in tv.subpolicies(aa):
        slots = []
        for name, p, idx in subpolicy:
            fn, signed = tv.augmentation_space(aa)[name]
            magnitudes = fn(10, size, size)
            slots.append((name, 0.0 if magnitudes is None else float(magnitudes[idx]), signed, p))
        table.append(slots)
    assert len(table) == 25

    def fits(slot, draw):
        name, magnitude, signed, p = slot
        if draw is None:
            return p < 1
        return p > 0 and draw[0] == name and abs(draw[1]) == magnitude and (signed or draw[1] >= 0)

    identified = set()
    for draw0, draw1 in zip(*rounds):
        matches = [s for s, (a, b) in enumerate(table) if fits(a, draw0) and fits(b, draw1)]
        assert matches, f"({draw0}, {draw1}) is no sub-policy of AutoAugment's CIFAR-10 policy"
        if len(matches) == 1:
            identified.add(matches[0])
    assert len(identified) >= 20  # drawn per image: 20,000 images show most of the 25 sub-policies

    # How often each slot's operation is applied: 1/25 of its p, summed over the sub-policies
    # that share its (operation, magnitude) in that slot. 6 standard errors: a fixed seed, wide.
    for r in range(2):
        expected: dict[tuple[str, float], float] = {}
        for slots in table:
            name, magnitude, _, p = slots[r]
            expected[(name, magnitude)] = expected.get((name, magnitude), 0.0) + p / 25
        counts: dict[tuple[str, float], int] = {}
        for draw in rounds[r]:
            if draw is not None:
                key = (draw[0], abs(draw[1]))
                counts[key] = counts.get(key, 0) + 1
        assert set(counts) <= set(expected)
        for key, share in expected.items():
            observed = counts.get(key, 0) / n
            assert abs(observed - share) <= 6 * math.sqrt(share * (1 - share) / n) + 1e-9, (r, key, observed, share)
    signed = [d[1] < 0 for draws in rounds for d in draws if d is not None and tv.augmentation_space(aa)[d[0]][1]]
    assert abs(np.mean(signed) - 0.5) < 0.03


def test_a_policy_with_a_gpu_generator_needs_a_host_generator():
    x = batch(4, s=8)
    aug = BatchAugment(8, CIFAR_MEAN, CIFAR_STD, policy="autoaugment")
    on_gpu = SimpleNamespace(device=torch.device("cuda"))  # the check reads only where it lives
    with pytest.raises(ValueError, match="host_generator"):
        aug(x, on_gpu)
    with pytest.raises(ValueError, match="CPU"):
        aug(x, torch.Generator(), host_generator=on_gpu)
    with pytest.raises(ValueError, match="CPU"):
        aug.policy_draws(x, on_gpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augment_on_gpu_with_a_gpu_generator_matches_the_cpu_semantics():
    x = batch(32).cuda()
    aug = BatchAugment(8, CIFAR_MEAN, CIFAR_STD, crop_padding=0, flip=True)
    out = aug(x, torch.Generator(device="cuda").manual_seed(0))
    assert out.device.type == "cuda" and out.dtype == torch.float32
    ref = normalize(x, CIFAR_MEAN, CIFAR_STD)
    same, mirrored = (out == ref).flatten(1).all(1), (out == ref.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    assert torch.equal(aug(x, torch.Generator().manual_seed(1)).cpu(), aug(x.cpu(), torch.Generator().manual_seed(1)))
    for policy in ("randaugment", "autoaugment"):
        heavy = BatchAugment(8, CIFAR_MEAN, CIFAR_STD, policy=policy, erasing=0.25)
        with pytest.raises(ValueError, match="host_generator"):
            heavy(x, torch.Generator(device="cuda").manual_seed(0))
        a = heavy(x, torch.Generator(device="cuda").manual_seed(0), host_generator=torch.Generator().manual_seed(0))
        b = heavy(x, torch.Generator(device="cuda").manual_seed(0), host_generator=torch.Generator().manual_seed(0))
        assert a.shape == (32, 3, 8, 8) and a.device.type == "cuda" and torch.isfinite(a).all()
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Random erasing
# ---------------------------------------------------------------------------------------------


def test_erasing_gives_each_image_what_torchvision_erase_gives_it():
    x = batch(64, s=16)
    aug = BatchAugment(16, CIFAR_MEAN, CIFAR_STD, crop_padding=None, flip=False, erasing=0.5)
    out = aug(x, torch.Generator().manual_seed(2))
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(2)))  # deterministic
    # The same stream: the boxes, then the noise they are filled with.
    ref = torch.Generator().manual_seed(2)
    apply, i, j, h, w = aug.erasing_draws(64, 16, 16, ref)
    noise = torch.randn((64, 3, 16, 16), generator=ref)
    plain = normalize(x, CIFAR_MEAN, CIFAR_STD)
    assert apply.dtype == torch.bool and 10 < int(apply.sum()) < 54
    for k in range(64):
        if apply[k]:
            i_, j_, h_, w_ = int(i[k]), int(j[k]), int(h[k]), int(w[k])
            expected = TF.erase(plain[k], i_, j_, h_, w_, noise[k, :, i_:i_ + h_, j_:j_ + w_])
            assert not torch.equal(expected, plain[k])
        else:
            expected = plain[k]  # untouched
        assert torch.equal(out[k], expected), k


def test_erasing_boxes_keep_to_the_scale_and_ratio_limits_and_p():
    n, size, p = 20_000, 32, 0.25
    aug = BatchAugment(size, CIFAR_MEAN, CIFAR_STD, erasing=p)
    apply, i, j, h, w = aug.erasing_draws(n, size, size, torch.Generator().manual_seed(0))
    assert abs(apply.float().mean().item() - p) < 0.02  # at 32 px some attempt of 10 fits almost always
    assert (h[~apply] == 0).all() and (w[~apply] == 0).all()
    i, j, h, w = i[apply].double(), j[apply].double(), h[apply].double(), w[apply].double()
    assert (h >= 1).all() and (w >= 1).all() and (h < size).all() and (w < size).all()
    assert (i >= 0).all() and (j >= 0).all() and (i + h <= size).all() and (j + w <= size).all()
    # h and w are rounded, so the limits hold up to half a pixel on each side.
    area = size * size
    assert ((h + 0.5) * (w + 0.5) >= ERASING_SCALE[0] * area).all()
    assert ((h - 0.5) * (w - 0.5) <= ERASING_SCALE[1] * area).all()
    assert ((h + 0.5) / (w - 0.5) >= ERASING_RATIO[0]).all() and ((h - 0.5) / (w + 0.5) <= ERASING_RATIO[1]).all()
    assert i.max() > 0 and j.max() > 0  # placed anywhere, not at the corner


@pytest.mark.parametrize("height, width", [(5, 5), (32, 32), (3, 64)])
def test_erasing_boxes_are_distributed_as_torchvisions(height, width):
    # torchvision draws one image at a time with the global RNG; compare the distributions. At
    # 5 px many attempts do not fit, which tests taking the first one that does; at 3 x 64 px
    # about half the images have no attempt that fits, and are not erased.
    n = 4000
    erasing = v2.RandomErasing(p=1.0, value="random")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        params = [erasing.make_params([torch.zeros(3, height, width)]) for _ in range(n)]
    theirs = torch.tensor([[p["v"] is not None, p["i"], p["j"], p["h"], p["w"]] for p in params], dtype=torch.float64)
    aug = BatchAugment(8, CIFAR_MEAN, CIFAR_STD, erasing=1.0)
    ours = torch.stack(aug.erasing_draws(n, height, width, torch.Generator().manual_seed(0)), 1).double()
    share_theirs, share_ours = theirs[:, 0].mean(), ours[:, 0].mean()
    assert abs(share_ours - share_theirs) < 0.04
    mean_theirs = theirs[theirs[:, 0] > 0, 1:].mean(0)
    mean_ours = ours[ours[:, 0] > 0, 1:].mean(0)
    torch.testing.assert_close(mean_ours, mean_theirs, atol=0.15, rtol=0.05)


def test_erasing_skips_images_where_no_box_fits():
    # 1 x 64 px: the smallest box (2% of 64 pixels) cannot be less than one row high, so
    # torchvision erases nothing; neither must we.
    aug = BatchAugment(8, CIFAR_MEAN, CIFAR_STD, erasing=1.0)
    apply, _, _, h, w = aug.erasing_draws(16, 1, 64, torch.Generator().manual_seed(0))
    assert not apply.any() and not h.any() and not w.any()
    plain = normalize(batch(16, s=64)[:, :, :1], CIFAR_MEAN, CIFAR_STD)
    assert torch.equal(aug.random_erasing(plain, torch.Generator().manual_seed(0)), plain)


# ---------------------------------------------------------------------------------------------
# BatchAugment: the pieces in order
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [None, "randaugment", "autoaugment"])
def test_batch_augment_is_its_pieces_in_deits_order(policy):
    x = batch(32, s=20)
    aug = BatchAugment(16, CIFAR_MEAN, CIFAR_STD, crop_padding=3, policy=policy, erasing=0.5, padding_mode="reflect")
    assert (aug.crop_padding, aug.flip, aug.padding_mode, aug.policy, aug.erasing) == (3, True, "reflect", policy, 0.5)
    g, host = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    out = aug(x, g, host_generator=host)
    ref, ref_host = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    expected = RandomCropFlip(16, 3, flip=True, padding_mode="reflect")(x, ref)
    if policy is not None:
        expected = AugmentPolicy(policy)(expected, ref_host)
    expected = RandomErasing(0.5)(normalize(expected, CIFAR_MEAN, CIFAR_STD), ref)
    assert torch.equal(out, expected)
    assert torch.equal(g.get_state(), ref.get_state()) and torch.equal(host.get_state(), ref_host.get_state())


def test_pieces_with_nothing_to_do_return_the_batch_and_draw_nothing():
    # BatchAugment relies on this: without crop, flip or erasing, the stream holds only the policy's draws.
    x, g = batch(), torch.Generator().manual_seed(0)
    state = g.get_state()
    assert RandomCropFlip(8, padding=None, flip=False)(x, g) is x
    plain = normalize(x, CIFAR_MEAN, CIFAR_STD)
    assert RandomErasing(0.0)(plain, g) is plain
    assert torch.equal(g.get_state(), state)


# ---------------------------------------------------------------------------------------------
# Mixup and CutMix
# ---------------------------------------------------------------------------------------------


def float_batch(b: int = 8, s: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, 3, s, s), generator=g), torch.randint(0, 10, (b,), generator=g)


def test_mixup_mixes_the_batch_with_itself_reversed():
    x, y = float_batch()
    before = x.clone()
    mix = MixUpCutMix(10, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    draw = mix.draw(8, 8, np.random.default_rng(3))
    assert not draw.cutmix and 0 < draw.lam < 1
    out, targets = mix(x, y, np.random.default_rng(3))
    assert torch.equal(x, before)  # the input is left as it was
    torch.testing.assert_close(out, draw.lam * x + (1 - draw.lam) * x.flip(0))
    assert targets.dtype == torch.float32 and targets.shape == (8, 10)
    torch.testing.assert_close(targets, timm_mixup.mixup_target(y, 10, draw.lam, 0.1))


def test_cutmix_pastes_a_box_of_the_reversed_batch():
    x, y = float_batch(s=16)
    mix = MixUpCutMix(10, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    for seed in range(10):
        draw = mix.draw(16, 16, np.random.default_rng(seed))
        out, targets = mix(x, y, np.random.default_rng(seed))
        top, bottom, left, right = draw.box
        assert draw.cutmix and 0 <= top <= bottom <= 16 and 0 <= left <= right <= 16
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(out, torch.where(inside, x.flip(0), x))
        assert draw.lam == pytest.approx(1 - inside.float().mean().item())
        torch.testing.assert_close(targets, timm_mixup.mixup_target(y, 10, draw.lam, 0.1))


@pytest.mark.parametrize("lam, cy, cx", [(0.3, 8, 5), (0.9, 0, 15), (0.05, 15, 0), (0.5, 3, 12), (0.999, 7, 7)])
def test_cutmix_box_is_timms_rand_bbox(monkeypatch, lam, cy, cx):
    class Fixed:  # a generator that answers with the given draws
        def __init__(self):
            self.centre = [cy, cx]

        def random(self):
            return 0.0  # mix, and pick CutMix

        def beta(self, a, b):
            return lam

        def integers(self, low, high):
            assert (low, high) == (0, 16)
            return self.centre.pop(0)

    draw = MixUpCutMix(10).draw(16, 16, Fixed())
    centres = iter([cy, cx])
    monkeypatch.setattr(timm_mixup.np.random, "randint", lambda low, high, size=None: next(centres))
    (yl, yh, xl, xh), timm_lam = timm_mixup.cutmix_bbox_and_lam((16, 16), lam)
    assert draw == MixDraw(pytest.approx(timm_lam), cutmix=True, box=(yl, yh, xl, xh))


def test_mixup_and_cutmix_take_turns_per_batch_and_targets_are_distributions():
    x, y = float_batch(s=8)
    mix = MixUpCutMix(10)  # DeiT's: mixup 0.8, CutMix 1.0, switch 0.5, smoothing 0.1
    rng = np.random.default_rng(0)
    modes = []
    for _ in range(200):
        out, targets = mix(x, y, rng)
        assert (targets >= 0).all()
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        is_cut = ((out == x) | (out == x.flip(0))).all().item()  # CutMix copies pixels, mixup blends
        modes.append(is_cut)
    assert 70 < sum(modes) < 130


def test_without_mixing_targets_are_smoothed_one_hots_and_images_untouched():
    x, y = float_batch()
    for mix in (MixUpCutMix(10, prob=0.0), MixUpCutMix(10, mixup_alpha=0.0, cutmix_alpha=0.0, prob=0.0)):
        out, targets = mix(x, y, np.random.default_rng(0))
        assert torch.equal(out, x)
        torch.testing.assert_close(targets, timm_mixup.mixup_target(y, 10, 1.0, 0.1))


def test_mixing_is_deterministic_under_a_numpy_seed():
    x, y = float_batch()
    mix = MixUpCutMix(10)
    a = mix(x, y, np.random.default_rng(5))
    b = mix(x, y, np.random.default_rng(5))
    c = mix(x, y, np.random.default_rng(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_soft_cross_entropy_is_cross_entropy_with_label_smoothing():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn((8, 10), generator=g) * 3, torch.randint(0, 10, (8,), generator=g)
    for s in (0.0, 0.1, 0.3):
        _, targets = MixUpCutMix(10, prob=0.0, label_smoothing=s)(torch.zeros(8, 3, 2, 2), y, np.random.default_rng(0))
        torch.testing.assert_close(soft_cross_entropy(logits, targets), F.cross_entropy(logits, y, label_smoothing=s))


@pytest.mark.parametrize("kwargs", [
    {"num_classes": 1}, {"num_classes": 2.0}, {"mixup_alpha": -0.1}, {"cutmix_alpha": float("nan")},
    {"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, {"switch_prob": 1.5}, {"prob": -0.5}, {"label_smoothing": 1.0},
    {"label_smoothing": -0.1},
])
def test_mixupcutmix_refuses_bad_arguments(kwargs):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError):
        MixUpCutMix(kwargs.pop("num_classes"), **kwargs)


def test_mixupcutmix_refuses_bad_batches():
    x, y = float_batch()
    mix = MixUpCutMix(10)
    for bad_x, bad_y in [(x.to(torch.uint8), y), (x, y.int()), (x, y[:4]), (x, y + 10)]:
        with pytest.raises(ValueError):
            mix(bad_x, bad_y, np.random.default_rng(0))
