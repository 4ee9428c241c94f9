"""vitdemo.ood: the Mahalanobis out-of-distribution score, its fitting, and its statistics in
checkpoints (the shipped CIFAR-10 model's, a command-line run's, and the fit-ood command's)."""

import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import vitdemo
from vitdemo.data import Preprocessing
from vitdemo import ood
from vitdemo.checkpoint import load_checkpoint, read_metadata, save_checkpoint, update_metadata
from vitdemo.cli import main
from vitdemo.data import (
    CIFAR10_CLASSES,
    checkpoint_data,
    load_image,
    normalize,
    preprocess,
    stratified_split,
    synthetic_shapes,
)
from vitdemo.engine import RECIPES, train
from vitdemo.runtime import weights_digest

# CIFAR-10's training images, beside the project's checkout (absent from a user's clone).
CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train.tar.gz"
PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return vitdemo.create_model("vit_cifar_4", num_classes=4, depth=1, embed_dim=32, num_heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def shapes():
    data = synthetic_shapes(num_classes=4, per_class=100, image_size=32, seed=0)
    tr, va = stratified_split(data.labels, 0.3, seed=0)
    return data.subset(tr), data.subset(va)


@pytest.fixture(scope="module")
def fitted(shapes):
    model = tiny_model()
    return model, ood.fit(model, *shapes, PREP)


@pytest.fixture(scope="module")
def shipped():
    model, meta = vitdemo.load_checkpoint()
    return model, meta


def class_token(model, images_uint8, after_norm=False):
    """The class token entering the final LayerNorm (z_L^0 of the ViT paper's Eq. 4), or after it,
    computed layer by layer here, independently of vitdemo.ood."""
    x = normalize(images_uint8, PREP.mean, PREP.std)
    with torch.no_grad():
        model.eval()
        z = torch.cat([model.cls_token.expand(len(x), -1, -1), model.patch_embed(x)], dim=1) + model.pos_embed
        for block in model.blocks:
            z = block(z)[0]
        return (model.norm(z) if after_norm else z)[:, 0].double()


# ---------------------------------------------------------------------------------------------
# Fitting, on a tiny model and synthetic data
# ---------------------------------------------------------------------------------------------


def test_fit_calibrates_at_most_the_false_alarm_rate_on_the_held_out_images(shapes, fitted):
    model, stats = fitted
    train_data, val_data = shapes
    held_out = ood.scores(model, normalize(val_data.images, PREP.mean, PREP.std), {"ood": stats})
    assert held_out.shape == (len(val_data),)
    flagged = (held_out > stats["threshold"]).sum().item()
    # Exactly floor(5% of 120) = 6 above the threshold: calibrated on these held-out images,
    # not on the training images (those sit closer to the means and would flag more of these).
    assert flagged == math.floor(0.05 * len(val_data)) == 6
    assert stats["calibration"] == {"train_images": len(train_data), "held_out_images": len(val_data),
                                    "held_out_flagged": pytest.approx(6 / len(val_data))}
    assert stats["false_alarm_rate"] == 0.05
    training = ood.scores(model, normalize(train_data.images, PREP.mean, PREP.std), {"ood": stats})
    assert training.median() < held_out.median()  # why the threshold comes from held-out images


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25])
def test_other_false_alarm_rates(shapes, rate):
    model = tiny_model()
    stats = ood.fit(model, *shapes, PREP, false_alarm_rate=rate)
    held_out = ood.scores(model, normalize(shapes[1].images, PREP.mean, PREP.std), {"ood": stats})
    assert (held_out > stats["threshold"]).sum().item() == math.floor(rate * len(held_out))


def test_means_and_shared_covariance_are_lee_et_al_eq_1_and_the_score_their_eq_2(shapes, fitted):
    """Checked against numpy: class means and the pooled (tied) covariance of the class-token
    features of the training images, its pseudo-inverse, and distances by a loop over the classes."""
    model, stats = fitted
    train_data, val_data = shapes
    feats = class_token(model, train_data.images).numpy()
    labels = train_data.labels.numpy()
    means = np.stack([feats[labels == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(np.array(stats["means"]), means, rtol=1e-5, atol=1e-5)
    centred = feats - means[labels]
    covariance = centred.T @ centred / len(feats)
    precision = np.linalg.pinv(covariance, rcond=1e-10, hermitian=True)
    whitening = np.array(stats["whitening"], dtype=np.float64)
    assert whitening.shape == (32, 32)  # before the LayerNorm no direction is lost
    np.testing.assert_allclose(whitening @ whitening.T, precision, rtol=1e-3, atol=1e-4 * np.abs(precision).max())

    queries = class_token(model, val_data.images[:8]).numpy()
    expected = [math.sqrt(min((q - m) @ precision @ (q - m) for m in means)) for q in queries]
    got = ood.scores(model, normalize(val_data.images[:8], PREP.mean, PREP.std), {"ood": stats})
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-3)


def test_the_final_layernorm_makes_the_covariance_singular_and_exactly_that_direction_is_dropped(shapes):
    model = tiny_model()
    stats = ood.fit(model, *shapes, PREP, feature="post_norm")
    assert stats["feature"] == "post_norm"
    feats = class_token(model, shapes[0].images, after_norm=True)
    assert torch.allclose(ood.features(model, normalize(shapes[0].images, PREP.mean, PREP.std), "post_norm"),
                          feats.float(), atol=1e-5)
    # The normalised values (f - beta) / gamma of every feature sum to zero: one direction has no variance.
    gamma, beta = model.norm.weight.double().detach(), model.norm.bias.double().detach()
    assert ((feats - beta) / gamma).sum(1).abs().max() < 1e-4
    whitening = torch.tensor(stats["whitening"], dtype=torch.float64)
    assert whitening.shape == (32, 31)
    # The kept directions are orthogonal to that one, 1 / gamma (the whitening's columns are
    # directions scaled by 1 / standard deviation: normalise them first).
    null = (1 / gamma) / (1 / gamma).norm()
    assert (null @ (whitening / whitening.norm(dim=0))).abs().max() < 1e-3


def test_scores_leave_the_model_as_it_was_and_are_deterministic(fitted, shapes):
    model, stats = fitted
    x = normalize(shapes[1].images[:4], PREP.mean, PREP.std)
    model.train()
    try:
        first = ood.scores(model, x, {"ood": stats})
        assert model.training
        assert torch.equal(first, ood.scores(model, x, {"ood": stats}))  # dropout stays off
    finally:
        model.eval()


def test_check_says_flagged_and_relative_to_the_threshold(fitted, shapes):
    model, stats = fitted
    x = normalize(shapes[1].images, PREP.mean, PREP.std)
    verdicts = ood.check(model, x, {"ood": stats})
    values = ood.scores(model, x, {"ood": stats})
    assert [v.score for v in verdicts] == pytest.approx(values.tolist())
    assert [v.flagged for v in verdicts] == (values > stats["threshold"]).tolist()
    assert all(v.flagged == (v.relative > 1) for v in verdicts)
    assert verdicts[0].relative == pytest.approx(values[0].item() / stats["threshold"])


def test_missing_or_mismatched_statistics_are_a_clear_error(fitted, shapes):
    model, stats = fitted
    x = normalize(shapes[1].images[:2], PREP.mean, PREP.std)
    assert not ood.has_stats({"class_names": ["a"]}) and ood.has_stats({"ood": stats})
    with pytest.raises(ood.OODUnavailable, match="fit-ood"):
        ood.scores(model, x, {"class_names": ["a"]})
    wider = vitdemo.create_model("vit_cifar_4", num_classes=4, depth=1, embed_dim=64, num_heads=2, mlp_dim=64)
    with pytest.raises(ood.OODUnavailable, match="do not fit this model"):
        ood.scores(wider, x, {"ood": stats})
    with pytest.raises(ValueError, match="held-out"):
        ood.fit(model, shapes[0], None, PREP)


def test_auroc_is_the_probability_that_an_outside_image_scores_higher():
    inside, outside = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 5.0])
    # 9 pairs: outside higher in 7, one tie (2, 2) counting half.
    assert ood.auroc(inside, outside) == pytest.approx(7.5 / 9)
    assert ood.auroc(outside, inside) == pytest.approx(1.5 / 9)
    assert ood.auroc(torch.zeros(4), torch.zeros(3)) == 0.5
    rng = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, generator=rng), torch.randn(300, generator=rng) + 1
    assert ood.auroc(a, b) == pytest.approx((b[None, :] > a[:, None]).double().mean().item())


# ---------------------------------------------------------------------------------------------
# Checkpoints: the statistics round trip, the train command fits them, fit-ood rewrites them
# ---------------------------------------------------------------------------------------------


def test_statistics_round_trip_through_a_checkpoint(fitted, shapes, tmp_path):
    model, stats = fitted
    x = normalize(shapes[1].images, PREP.mean, PREP.std)
    before = ood.scores(model, x, {"ood": stats})
    path = save_checkpoint(tmp_path / "model.safetensors", model, shapes[0].class_names, PREP, ood=stats)
    loaded, meta = load_checkpoint(path)
    assert meta["ood"]["threshold"] == stats["threshold"]
    assert torch.equal(ood.scores(loaded, x, meta), before)
    assert [v.flagged for v in ood.check(loaded, x, meta)] == (before > stats["threshold"]).tolist()


def test_update_metadata_keeps_the_weights_bit_for_bit(fitted, shapes, tmp_path):
    model, stats = fitted
    path = save_checkpoint(tmp_path / "model.safetensors", model, shapes[0].class_names, PREP, metrics={"a": 1})
    digest = weights_digest(load_checkpoint(path)[0])
    update_metadata(tmp_path, ood=stats)
    loaded, meta = load_checkpoint(path)
    assert weights_digest(loaded) == digest  # what an ONNX export beside it is tied to
    assert meta["metrics"] == {"a": 1} and meta["ood"] == stats
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_the_engine_alone_fits_no_statistics(shapes, tmp_path):
    """`train` leaves them to its caller, which fits them on the finished weights (next tests)."""
    recipe = RECIPES["small-data"].replace(epochs=2, batch_size=64, ema_decay=0.9)
    events = list(train(tiny_model(), *shapes, recipe, preprocess=PREP, device="cpu", out_dir=tmp_path))
    done = events[-1]
    assert done.checkpoint == tmp_path / "model.safetensors"
    assert done.ema_checkpoint == tmp_path / "ema" / "model.safetensors"
    assert not any("ood" in read_metadata(path) for path in (done.checkpoint, done.ema_checkpoint))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", "synthetic", "--out", str(out), "--epochs", "1", "--batch-size", "128",
                 "--val-size", "200", "--split-seed", "3", "--device", "cpu", "--ema", "0.9",
                 "--set", "depth=1", "embed_dim=32", "num_heads=2", "mlp_dim=64"]) == 0
    return out


@pytest.mark.parametrize("weights", ["", "ema"])
def test_a_finished_command_line_run_carries_the_statistics_of_its_weights(cli_run, weights):
    """The command fits them after training, on the run's own split, for the trained weights and
    the moving average's each: the means and covariance from the training images, the threshold
    flagging 5% of the held-out ones."""
    model, meta = load_checkpoint(cli_run / weights)
    data = checkpoint_data(meta)
    assert meta["ood"] == ood.fit(model, data.train, data.val, data.preprocessing)
    assert meta["ood"]["calibration"] == {"train_images": 1000, "held_out_images": 200, "held_out_flagged": 0.05}
    if weights:
        assert meta["ood"]["means"] != read_metadata(cli_run)["ood"]["means"]  # the average's own


def test_fit_ood_command_refits_on_the_recorded_split_and_keeps_the_weights(cli_run, capsys):
    model, meta = load_checkpoint(cli_run)
    assert meta["ood"]["calibration"] == {"train_images": 1000, "held_out_images": 200, "held_out_flagged": 0.05}
    digest = weights_digest(model)
    assert main(["fit-ood", "--checkpoint", str(cli_run), "--data", "synthetic", "--false-alarm-rate", "0.2"]) == 0
    assert "200 held-out images" in capsys.readouterr().out
    refitted, new = load_checkpoint(cli_run)
    assert weights_digest(refitted) == digest
    assert new["ood"]["means"] == meta["ood"]["means"]  # the same training images: the same statistics
    assert new["ood"]["threshold"] < meta["ood"]["threshold"]
    assert new["ood"]["calibration"]["held_out_flagged"] == 0.2
    assert {k: v for k, v in new.items() if k != "ood"} == {k: v for k, v in meta.items() if k != "ood"}


@pytest.mark.parametrize("argv, message", [
    (["--split-seed", "4"], "--split-seed 4 is not the split the model was trained with (3)"),
    (["--val-size", "0.1"], "--val-size 0.1 is not the split the model was trained with (200)"),
    (["--false-alarm-rate", "1.5"], "false_alarm_rate must be in [0, 1)"),
])
def test_fit_ood_command_refuses_another_split(cli_run, capsys, argv, message):
    assert main(["fit-ood", "--checkpoint", str(cli_run), "--data", "synthetic", *argv]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The shipped CIFAR-10 model
# ---------------------------------------------------------------------------------------------


def test_shipped_model_carries_its_statistics(shipped):
    model, meta = shipped
    stats = meta["ood"]
    assert len(stats["means"]) == 10 and len(stats["means"][0]) == model.config.embed_dim == 192
    assert stats["false_alarm_rate"] == 0.05
    # Means and covariance from the 45,000 training images of the split, the threshold from the 5,000 held out.
    assert stats["calibration"]["train_images"] == 45_000 and stats["calibration"]["held_out_images"] == 5_000
    assert stats["calibration"]["held_out_flagged"] <= 0.05


@pytest.mark.parametrize("kind", ood.UNLIKE_KINDS)
def test_shipped_model_flags_images_unlike_its_training_data(shipped, kind):
    model, meta = shipped
    images = ood.unlike_images(8, seed=123)[kind]
    x = torch.cat([preprocess(im, 32, meta["mean"], meta["std"]) for im in images])
    verdicts = ood.check(model, x, meta)
    assert sum(v.flagged for v in verdicts) >= 7, [round(v.relative, 2) for v in verdicts]


def held_out_cifar(meta, size):
    """`size` images (each class in proportion) of the validation split the shipped model was
    trained with, read straight from the archive: the order, labels and split of
    `load_image_folder` + `vitdemo.cli.split`, without decoding all 50,000 images."""
    with tarfile.open(CIFAR_TAR) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        files = {c: sorted((m for m in members if m.name.split("/")[-2] == c), key=lambda m: m.name)
                 for c in CIFAR10_CLASSES}  # class folders and files sorted by name, as load_image_folder does
        assert [len(v) for v in files.values()] == [5000] * 10
        ordered = [m for c in CIFAR10_CLASSES for m in files[c]]
        labels = torch.arange(10).repeat_interleave(5000)
        _, val_idx = stratified_split(labels, int(meta["val_size"]), seed=meta["split_seed"])
        pick = val_idx[stratified_split(labels[val_idx], size, seed=0)[1]]
        chosen = sorted((ordered[i] for i in pick.tolist()), key=lambda m: m.offset)  # one pass over the archive
        images = [load_image(tar.extractfile(m).read()) for m in chosen]
    return torch.cat([preprocess(im, 32, meta["mean"], meta["std"]) for im in images])


@pytest.mark.skipif(not CIFAR_TAR.exists(), reason=f"needs CIFAR-10's training images at {CIFAR_TAR}")
def test_shipped_threshold_false_alarms_on_held_out_cifar10(shipped):
    """500 of the 5,000 held-out images (never trained on): about 5% flagged. The bound allows
    two binomial standard deviations over 5% for 500 images (7.0%); a threshold taken from training
    images flags several times more."""
    model, meta = shipped
    x = held_out_cifar(meta, 500)
    flagged = (ood.scores(model, x, meta) > meta["ood"]["threshold"]).double().mean().item()
    assert flagged <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 500)
    assert flagged > 0  # a threshold above every in-distribution image would pass the bound above too


def test_features_are_this_threads_image_while_others_run_the_same_model():
    """The app shares one model between users: another thread's forward pass fires the feature
    hook too, and its image's class token replaced this one's (a wrong out-of-distribution flag)."""
    from helpers import others_running

    torch.manual_seed(0)
    model = vitdemo.create_model("vit_cifar_4", num_classes=4, depth=2, embed_dim=32, num_heads=2, mlp_dim=64).eval()
    x, others = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    alone = ood.features(model, x)
    with others_running(model, others):
        seen = [ood.features(model, x) for _ in range(50)]
    for got in seen:
        torch.testing.assert_close(got, alone)
