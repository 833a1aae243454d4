"""The grid linear probe: accuracy, the choice of learning rate and variant on held-out train data only, parity
with the scikit-learn probe, and its errors."""

import json

import pytest
import torch
from sklearn.datasets import load_digits

from unsupdistill.config import ConfigError
from unsupdistill.evaluate import linear_grid
from unsupdistill.evaluate.linear import linear_probe
from unsupdistill.evaluate.linear_grid import linear_probe_grid


def blobs(num_classes: int, n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearly separable features (n, dim): unit-variance Gaussians around class centres 10 apart."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, dim) * 10
    labels = torch.arange(n) % num_classes
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


def nuisance(n: int = 800, sigma: float = 20.0) -> tuple[torch.Tensor, ...]:
    """Two classes separable only by x1 - x2 = +-1, hidden under a shared nuisance z of std ``sigma``: (x1, x2) =
    (+-1 + z, z). The class-mean direction (x1), where SGD starts from zero, is near chance; reaching x1 - x2,
    the low-variance direction of the standardised features, takes a large enough learning rate. Returns
    train features, train labels, test features, test labels (3/4 and 1/4 of the rows)."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % 2
    noise = torch.randn(n, generator=generator) * sigma
    features = torch.stack([labels * 2 - 1 + noise, noise], dim=1)
    m = n * 3 // 4
    return features[:m], labels[:m], features[m:], labels[m:]


# lr 1e-2 barely leaves the class-mean direction in 10 epochs; lr 1e4 times weight decay 1e-3 is past the
# stability limit 2 (1 + momentum) of SGD's coupled decay, so its weights blow up; only lr 1 converges. The
# converging lr is not first in the grid, so a probe that gave every classifier the same lr (ties: first) fails.
NUISANCE_GRID = dict(lrs=(1e-2, 1.0, 1e4), weight_decays=(1e-3,), epochs=10, batch_size=32, device="cpu")


@pytest.mark.parametrize("num_classes", [3, 6])
def test_separable_features_are_classified_perfectly(num_classes: int) -> None:
    train_x, train_y = blobs(num_classes, 300)
    test_x, test_y = blobs(num_classes, 120, seed=1)
    result = linear_probe_grid(train_x, train_y, test_x, test_y, lrs=(0.01, 0.1), weight_decays=(0.0,), epochs=5,
                               device="cpu")
    assert result["top1"] >= 99
    assert ("top5" in result) == (num_classes > 5)
    assert result.get("top5", 100.0) == 100.0
    predictions = result["predictions"]
    assert predictions.shape == (120,) and predictions.dtype == torch.int64 and predictions.device.type == "cpu"
    assert result["top1"] == pytest.approx((predictions == test_y).double().mean().item() * 100)
    assert len(result["val_top1"]) == 2 and result["seconds"] > 0
    json.dumps({key: value for key, value in result.items() if key != "predictions"})  # the record is plain JSON


def test_the_returned_classifier_predicts_what_the_grid_scored() -> None:
    train_x, train_y = blobs(4, 200)
    train_x = train_x * 5 + 3  # far from standardised: the folded standardisation must account for it
    test_x, test_y = blobs(4, 80, seed=1)
    test_x = test_x * 5 + 3
    result = linear_probe_grid(train_x, train_y, test_x, test_y, lrs=(0.01, 0.1), weight_decays=(0.0,), epochs=5,
                               device="cpu", classifier=True)
    weight, bias = result["linear"]
    assert weight.shape == (4, train_x.shape[1]) and bias.shape == (4,)
    logits = test_x @ weight.T + bias
    assert torch.equal(logits.argmax(1), result["predictions"])
    assert "linear" not in linear_probe_grid(train_x, train_y, test_x, test_y, epochs=1, device="cpu")


def test_grid_picks_the_only_learning_rate_that_converges() -> None:
    result = linear_probe_grid(*nuisance(), **NUISANCE_GRID)
    val_top1 = [point["top1"] for point in result["val_top1"]]
    assert [point["lr"] for point in result["val_top1"]] == [1e-2, 1.0, 1e4]
    assert val_top1[1] == 100.0 and val_top1[0] < 75 and val_top1[2] < 75, val_top1
    assert result["best"] == {"variant": "all", "lr": 1.0, "weight_decay": 1e-3}
    assert result["top1"] == 100.0


def test_choice_never_sees_the_test_labels() -> None:
    train_x, train_y, test_x, test_y = nuisance()
    result = linear_probe_grid(train_x, train_y, test_x, test_y, **NUISANCE_GRID)
    # flipped test labels make the converged classifier the worst on the test split: choosing there would switch lr
    flipped = linear_probe_grid(train_x, train_y, test_x, 1 - test_y, **NUISANCE_GRID)
    assert flipped["best"] == result["best"] and flipped["val_top1"] == result["val_top1"]
    assert torch.equal(flipped["predictions"], result["predictions"])
    assert flipped["top1"] == pytest.approx(100 - result["top1"])
    permuted = linear_probe_grid(train_x, train_y, test_x, test_y[torch.randperm(len(test_y))], **NUISANCE_GRID)
    assert permuted["best"] == result["best"] and torch.equal(permuted["predictions"], result["predictions"])


def test_grid_picks_the_variant_whose_columns_carry_the_label() -> None:
    signal, labels = blobs(4, 400, dim=6)
    noise = torch.randn(400, 6, generator=torch.Generator().manual_seed(2)) * 10
    features = torch.cat([noise, signal], dim=1)[:, torch.tensor([0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11])]
    variants = {"noise": [0, 2, 4, 6, 8, 10], "noise_head": slice(0, 1), "signal": torch.tensor([1, 3, 5, 7, 9, 11])}
    result = linear_probe_grid(features[:300], labels[:300], features[300:], labels[300:], variants=variants,
                               lrs=(0.1,), weight_decays=(0.0,), epochs=5, device="cpu")
    assert result["best"]["variant"] == "signal"
    by_variant = {point["variant"]: point["top1"] for point in result["val_top1"]}
    assert by_variant["signal"] == 100.0 and by_variant["noise"] < 60 and by_variant["noise_head"] < 60
    assert result["top1"] == 100.0


def test_from_20000_rows_the_grid_trains_10_epochs_of_1024(monkeypatch) -> None:
    """Large splits get fewer, larger steps (10 epochs of 1,024 rows), small ones 20 epochs of 256; what the
    caller gives wins. Recorded at each training of the grid: the held-out choice (80 % of the rows), the refit."""
    trainings = []
    train = linear_grid._train

    def recorded(*args, **kwargs):
        trainings.append((kwargs["epochs"], kwargs["batch_size"], len(args[2])))
        return train(*args, **kwargs)

    monkeypatch.setattr(linear_grid, "_train", recorded)
    x, y = blobs(2, 20_000, dim=2)
    grid = dict(lrs=(0.1,), weight_decays=(0.0,), device="cpu")
    assert linear_probe_grid(x, y, x[:100], y[:100], **grid)["top1"] == 100.0
    assert trainings == [(10, 1024, 16_000), (10, 1024, 20_000)]
    trainings.clear()
    linear_probe_grid(x[:19_999], y[:19_999], x[:100], y[:100], **grid)
    assert trainings == [(20, 256, 15_999), (20, 256, 19_999)]
    trainings.clear()
    linear_probe_grid(x, y, x[:100], y[:100], epochs=1, batch_size=4096, **grid)
    assert trainings == [(1, 4096, 16_000), (1, 4096, 20_000)]


def test_a_diverged_classifier_scores_zero() -> None:
    """lr 1e4 blows the weights up to NaN, whose logits argmax to class 0: right on half the balanced held-out rows
    if it were scored as it predicts. Scored 0, it can never be chosen."""
    result = linear_probe_grid(*nuisance(), **NUISANCE_GRID)
    by_lr = {point["lr"]: point["top1"] for point in result["val_top1"]}
    assert by_lr[1e4] == 0.0 and 0 < by_lr[1e-2] < 100 and by_lr[1.0] == 100.0
    assert result["best"]["lr"] == 1.0


def test_a_constant_feature_column_changes_nothing() -> None:
    """A constant column (a dead ReLU unit) standardises to 0, not to 0 / 0: the grid scores, chooses and predicts
    as without it, and the returned classifier gives it no weight."""
    train_x, train_y = blobs(3, 300, dim=4)
    test_x, test_y = blobs(3, 90, dim=4, seed=1)
    arguments = dict(lrs=(0.01, 0.1), weight_decays=(0.0,), epochs=5, device="cpu", classifier=True)
    plain = linear_probe_grid(train_x, train_y, test_x, test_y, **arguments)

    def with_constant(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :2], torch.full((len(x), 1), 7.0), x[:, 2:]], dim=1)  # (N, 5), column 2 constant

    constant = linear_probe_grid(with_constant(train_x), train_y, with_constant(test_x), test_y, **arguments)
    assert constant["val_top1"] == plain["val_top1"] and constant["best"] == plain["best"]
    assert torch.equal(constant["predictions"], plain["predictions"]) and constant["top1"] == plain["top1"] > 95
    weight, bias = constant["linear"]
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    assert torch.equal(weight[:, 2], torch.zeros(3))
    torch.testing.assert_close(weight[:, [0, 1, 3, 4]], plain["linear"][0])


def test_matches_the_scikit_learn_probe_on_digits() -> None:
    digits = load_digits()
    x, y = torch.from_numpy(digits.data).float(), torch.from_numpy(digits.target)
    reference = linear_probe(x[:1300], y[:1300], x[1300:], y[1300:])
    result = linear_probe_grid(x[:1300], y[:1300], x[1300:], y[1300:], device="cpu")
    assert result["top1"] >= reference["top1"] - 1, (result["top1"], reference["top1"], result["best"])
    assert result["top5"] >= result["top1"]


@pytest.mark.parametrize(("change", "error", "message"), [
    (dict(train_y=torch.arange(9) % 2), ValueError, r"train_y \(9,\) does not match train_x \(10, 4\)"),
    (dict(test_x=torch.randn(6, 3)), ValueError, r"same D"),
    (dict(train_y=torch.zeros(10, dtype=torch.long)), ValueError, r"single class"),
    (dict(train_y=torch.tensor([0] * 9 + [1])), ValueError, r"train_y has classes \[1\] with a single sample"),
    (dict(train_y=torch.arange(10) % 2 * 1.0), ValueError, r"train_y is invalid; allowed: integer class indices"),
    (dict(test_y=torch.full((6,), 2)), ValueError, r"test_y holds class 2, absent from train_y; allowed: 0\.\.1"),
    (dict(lrs=()), ConfigError, r"lrs=\[\] is invalid; allowed values: a non-empty list"),
    (dict(weight_decays=(-1.0,)), ConfigError, r"weight_decays=\[-1\.0\] is invalid"),
    (dict(variants={}), ConfigError, r"variants is empty"),
    (dict(variants={"cls": slice(2, 9)}), ConfigError, r"variants\['cls'\] selects columns .* allowed: .* 0\.\.3"),
    (dict(variants={"cls": [0, 4]}), ConfigError, r"variants\['cls'\] selects columns \[0, 4\] of 4"),
    (dict(val_fraction=1.0), ConfigError, r"val_fraction=1\.0 is invalid"),
    (dict(val_fraction=0.05), ConfigError, r"val_fraction=0\.05 holds out 1 of 10 train samples"),
    (dict(epochs=0), ConfigError, r"epochs=0 is invalid"),
])
def test_bad_inputs_name_the_argument(change: dict, error: type, message: str) -> None:
    arguments = dict(train_x=torch.randn(10, 4), train_y=torch.arange(10) % 2, test_x=torch.randn(6, 4),
                     test_y=torch.arange(6) % 2, device="cpu")
    with pytest.raises(error, match=message):
        linear_probe_grid(**{**arguments, **change})


def test_eval_probes_a_vits_four_feature_variants_and_keeps_knn_on_its_pooled_output():
    """`unsupdistill eval` of a ViT: the grid tries the last block's class token or the last blocks', with or without
    the average-pooled patches (DINOv2's variants), from one extraction; k-NN still sees the pooled output."""
    from unsupdistill.evaluate.run import EvalOptions, evaluate

    vit = "timm:vit_tiny_patch16_224,img_size=16,patch_size=4,embed_dim=32,depth=2,num_heads=2"
    options = EvalOptions(clustering=False, plots=False, cache=False)
    probed = evaluate(vit, "digits", "digits", options)
    plain = evaluate(vit, "digits", "digits", EvalOptions(linear=False, clustering=False, plots=False, cache=False))
    assert {row["variant"] for row in probed["linear"]["val_top1"]} == {
        "cls_last1", "cls_last2", "cls_last1+avgpool", "cls_last2+avgpool"}
    rows = probed["linear"]["val_top1"]
    chosen = max(rows, key=lambda row: row["top1"])  # the first of the best held-out scores
    assert probed["linear"]["best"] == {key: chosen[key] for key in ("variant", "lr", "weight_decay")}
    assert len({row["top1"] for row in rows}) > 1  # a choice that mattered: the grid points score differently
    assert probed["feature_dim"] == plain["feature_dim"] == 32
    assert probed["knn"][20]["top1"] == pytest.approx(plain["knn"][20]["top1"], abs=0.2)  # the same features
