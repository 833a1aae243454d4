"""Multi-k k-NN evaluation, report tables and JSON, PNG plots (checked pixel by pixel). The k-NN benchmark script is
tested in test_benchmarks.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from unsupdistill.evaluate import report
from unsupdistill.evaluate.knn import knn_accuracy, knn_evaluate
from unsupdistill.evaluate.report import (
    embed_features_2d,
    format_table,
    plot_confusion,
    plot_feature_map,
    plot_knn_vs_k,
    write_json,
)


def clusters(num_points: int, num_classes: int, dim: int = 16, noise: float = 1.5, seed: int = 0):
    """Gaussian class clusters: features (N, D) and labels (N,), hard enough that k-NN makes mistakes."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator)
    labels = torch.randint(num_classes, (num_points,), generator=generator)
    return centres[labels] + noise * torch.randn(num_points, dim, generator=generator), labels


def split(num_classes: int, num_train: int = 600, num_test: int = 200, **kwargs):
    x, y = clusters(num_train + num_test, num_classes, **kwargs)
    return x[:num_train], y[:num_train], x[num_train:], y[num_train:]


def reference_knn(train_x, train_y, test_x, test_y, k: int, temperature: float = 0.07) -> tuple[float, float]:
    """Top-1 and top-5 (%) by the textbook recipe: full cosine matrix, top-k, one-hot weighted votes."""
    normalise = lambda x: torch.nn.functional.normalize(x.double(), dim=1)  # noqa: E731
    similarity = normalise(test_x) @ normalise(train_x).T  # (Q, N)
    top, index = similarity.topk(min(k, len(train_x)), dim=1)  # (Q, k)
    one_hot = torch.nn.functional.one_hot(train_y[index], int(train_y.max()) + 1).double()  # (Q, k, C)
    votes = (one_hot * (top / temperature).exp()[..., None]).sum(dim=1)  # (Q, C)
    top1 = (votes.argmax(dim=1) == test_y).double().mean().item() * 100
    top5 = (votes.topk(5, dim=1).indices == test_y[:, None]).any(dim=1).double().mean().item() * 100
    return top1, top5


# ----------------------------------------------------------------------------------------------
# knn_evaluate
# ----------------------------------------------------------------------------------------------


def test_knn_evaluate_agrees_with_knn_accuracy_for_each_k():
    data = split(10)
    ks = (1, 5, 10, 20, 100, 200)
    results = knn_evaluate(*data, ks=ks)
    assert sorted(results) == list(ks)
    for k in ks:
        assert results[k]["top1"] == pytest.approx(knn_accuracy(*data, k=k), abs=1e-9), k
    top1s = [results[k]["top1"] for k in ks]
    assert 30 < max(top1s) < 100 and len(set(top1s)) > 1  # a real task whose accuracy depends on k


def test_knn_evaluate_matches_a_dense_reference_including_top5():
    data = split(12)
    results = knn_evaluate(*data, ks=(3, 20, 50))
    for k in (3, 20, 50):
        top1, top5 = reference_knn(*data, k)
        assert results[k]["top1"] == pytest.approx(top1, abs=1e-9), k
        assert results[k]["top5"] == pytest.approx(top5, abs=1e-9), k


def test_knn_evaluate_batches_and_k_order_do_not_change_results():
    data = split(10)
    whole = knn_evaluate(*data, ks=(50, 5, 20), batch_size=10_000)
    assert knn_evaluate(*data, ks=(5, 20, 50), batch_size=7) == whole


def test_knn_evaluate_top5_only_with_more_than_five_classes():
    five = knn_evaluate(*split(5), ks=(10, 20))
    assert all(set(scores) == {"top1"} for scores in five.values())
    ten = knn_evaluate(*split(10), ks=(10, 20))
    for scores in ten.values():
        assert set(scores) == {"top1", "top5"}
        assert scores["top5"] >= scores["top1"]
    assert any(scores["top5"] > scores["top1"] for scores in ten.values())


def test_knn_evaluate_with_k_larger_than_the_train_set():
    train_x, train_y, test_x, test_y = split(8, num_train=30, num_test=50)
    results = knn_evaluate(train_x, train_y, test_x, test_y, ks=(10, 30, 100, 200))
    assert results[100] == results[200] == results[30]  # every k >= 30 votes with all 30 points
    assert results[100]["top1"] == pytest.approx(knn_accuracy(train_x, train_y, test_x, test_y, k=100), abs=1e-9)
    assert results[100]["top1"] == pytest.approx(reference_knn(train_x, train_y, test_x, test_y, 30)[0], abs=1e-9)


def test_knn_evaluate_rejects_bad_arguments():
    data = split(5, num_train=20, num_test=5)
    with pytest.raises(ValueError, match="ks"):
        knn_evaluate(*data, ks=())
    with pytest.raises(ValueError, match="ks"):
        knn_evaluate(*data, ks=(0, 10))
    with pytest.raises(ValueError, match="batch_size"):
        knn_evaluate(*data, ks=(10,), batch_size=0)


# ----------------------------------------------------------------------------------------------
# Tables and JSON
# ----------------------------------------------------------------------------------------------


ROWS = [{"model": "dino-resnet18", "k": 20, "top1": 91.234}, {"model": "random", "k": 200, "top1": 9.5},
        {"model": "x", "top1": float("nan")}]


def test_format_table_aligns_columns():
    lines = format_table(ROWS, ["model", "k", "top1"]).splitlines()
    assert lines[0].split() == ["model", "k", "top1"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["dino-resnet18", "20", "91.23"]
    assert lines[3].split() == ["random", "200", "9.50"]
    assert lines[4].split() == ["x", "nan"]  # the missing k is blank
    # numbers are right-aligned: their last characters line up under the header's
    for column in ("k", "top1"):
        end = lines[0].index(column) + len(column)
        assert all(line[end - 1] != " " for line in lines[2:4]), column
    assert len(lines[2]) == len(lines[3]) == len(lines[4]) == len(lines[0])  # the last column ends in line


def test_format_table_markdown_has_a_separator_row():
    lines = format_table(ROWS[:2], ["model", "top1"], markdown=True, precision=1).splitlines()
    assert len(lines) == 4
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == ["model", "top1"]
    separator = [cell.strip() for cell in lines[1].strip("|").split("|")]
    assert set(separator[0]) == {"-"} and separator[1].startswith("-") and separator[1].endswith(":")
    assert [cell.strip() for cell in lines[2].strip("|").split("|")] == ["dino-resnet18", "91.2"]
    assert len({len(line) for line in lines}) == 1 and all(line.startswith("| ") for line in lines)


def test_write_json_round_trips_and_replaces_atomically(tmp_path):
    results = {"knn": {"top1": 0.1 + 0.2, "per_k": [1 / 3, 2.5e-12]}, "confusion": torch.tensor([[1, 0], [2, 3]]),
               "weights": np.array([0.25, 0.5], dtype=np.float32), "count": np.int64(7), "ok": True}
    path = tmp_path / "out" / "results.json"
    path.parent.mkdir()
    path.write_text("old")
    write_json(results, path)
    loaded = json.loads(path.read_text())
    assert loaded == {"knn": {"top1": 0.1 + 0.2, "per_k": [1 / 3, 2.5e-12]}, "confusion": [[1, 0], [2, 3]],
                      "weights": [0.25, 0.5], "count": 7, "ok": True}
    assert loaded["knn"]["top1"] == 0.30000000000000004  # floats are not rounded
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left behind
    (tmp_path / "plain").touch()
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # the usual permissions, not 0600
    write_json({20: {"top1": 50.0}}, path)
    assert json.loads(path.read_text()) == {"20": {"top1": 50.0}}


def test_write_json_leaves_the_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "results.json"
    write_json({"a": 1}, path)
    with pytest.raises(TypeError):
        write_json({"a": object()}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_like() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """300 points in 10 classes, 64 dimensions (like the 8x8 digits)."""
    features, labels = clusters(300, 10, dim=64, noise=1.0)
    return features, labels, [f"digit {i}" for i in range(10)]


def pixels(path: Path) -> np.ndarray:
    """The PNG's RGB pixels (H, W, 3) as int64."""
    image = Image.open(path)
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(np.int64)


def axes_frame(image: np.ndarray) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) pixel positions of the first axes' spines: the first two dark lines running over
    half the picture's height (columns) and width (rows); a later pair (a colour bar's) is left out."""
    dark = image.max(axis=-1) < 80

    def lines(counts: np.ndarray, length: float) -> list[int]:
        index = np.nonzero(counts > length)[0]
        return [int(run.mean()) for run in np.split(index, np.nonzero(np.diff(index) > 1)[0] + 1) if len(run)]

    columns, rows = lines(dark.sum(axis=0), image.shape[0] / 2), lines(dark.sum(axis=1), image.shape[1] / 2)
    assert len(columns) >= 2 and len(rows) >= 2, (columns, rows)
    return columns[0], columns[1], rows[0], rows[1]


def on_axes(values: np.ndarray, start: int, end: int, log: bool = False) -> np.ndarray:
    """Pixel positions of data values along an axis spanning ``start``..``end`` pixels, with matplotlib's automatic
    limits: the data's range and 5 % of it either side (in log10 space for a log axis)."""
    values = np.log10(values) if log else np.asarray(values, dtype=float)
    low, high = values.min(), values.max()
    low, high = low - 0.05 * (high - low), high + 0.05 * (high - low)
    return start + (values - low) / (high - low) * (end - start)


def colour_near(image: np.ndarray, x: float, y: float, colour: np.ndarray, radius: int = 2) -> bool:
    """Whether a pixel within ``radius`` of (x, y) has ``colour`` (within antialiasing)."""
    x, y = round(float(x)), round(float(y))
    window = image[y - radius:y + radius + 1, x - radius:x + radius + 1]
    return bool((np.abs(window - colour).sum(axis=-1) < 40).any())


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_plot_feature_map_draws_each_point_where_embedded_in_its_class_colour(tmp_path, monkeypatch, digits_like,
                                                                              method):
    features, labels, classes = digits_like
    embeddings = []  # the plot's embedding (test_embed_features_2d_... checks it), kept to check the drawing

    def embed(*args, **kwargs):
        embeddings.append(embed_features_2d(*args, **kwargs))
        return embeddings[-1]

    monkeypatch.setattr(report, "embed_features_2d", embed)
    path = tmp_path / f"map-{method}.png"
    plot_feature_map(features, labels, classes, path, method=method, title="digits")
    image = pixels(path)
    [(coordinates, shown, name)] = embeddings
    assert name == {"pca": "PCA", "tsne": "t-SNE"}[method] and len(shown) == 300
    left, right, top, bottom = axes_frame(image)
    xs, ys = on_axes(coordinates[:, 0], left, right), on_axes(coordinates[:, 1], bottom, top)  # y grows upwards
    drawn = colormaps["tab10"](np.arange(10))[:, :3] * 255 * 0.8 + 255 * 0.2  # tab10 at alpha 0.8 on white
    classes_shown = labels.numpy()[shown]

    def share_in(colour_of: np.ndarray) -> float:
        return float(np.mean([colour_near(image, x, y, drawn[c]) for x, y, c in zip(xs, ys, colour_of)]))

    assert share_in(classes_shown) > 0.9  # each point at its coordinates, in its class's colour (some hidden)
    assert share_in((classes_shown + 1) % 10) < 0.1  # not in another class's


def test_plot_confusion_draws_the_row_normalised_matrix(tmp_path, digits_like):
    _, labels, classes = digits_like
    predicted = labels.clone()
    predicted[::7] = (predicted[::7] + 1) % 10  # a seventh of each class taken for the next class
    path = tmp_path / "confusion.png"
    plot_confusion(labels, predicted, classes, path, title="k-NN, k=20")
    image = pixels(path)
    left, right, top, bottom = axes_frame(image)  # the matrix's axes, not the colour bar's
    width, height = (right - left) / 10, (bottom - top) / 10
    shares = np.zeros((10, 10))
    for true, guess in zip(labels.tolist(), predicted.tolist()):
        shares[true, guess] += 1
    shares /= shares.sum(axis=1, keepdims=True)
    assert 0.7 < shares.diagonal().min() and 0.05 < shares[0, 1] < 0.3

    def drawn(row: int, column: int) -> np.ndarray:  # a cell's colour, off its centre and the number written there
        return image[int(top + (row + 0.2) * height), int(left + (column + 0.2) * width)]

    for (row, column), share in np.ndenumerate(shares):  # row: the true class, column: the predicted one
        expected = np.array(colormaps["Blues"](share)[:3]) * 255
        assert np.abs(drawn(row, column) - expected).sum() < 8, (row, column, share, drawn(row, column))


def test_plot_knn_vs_k_draws_each_model_at_its_accuracies_on_a_log_axis(tmp_path):
    results = {"dino": {10: 80.0, 20: 81.5, 100: 79.0, 200: 77.2}, "random init": {"10": 20.0, "200": 15.0}}
    path = tmp_path / "knn.png"
    plot_knn_vs_k(results, path)
    image = pixels(path)
    left, right, top, bottom = axes_frame(image)
    points = [(name, int(k), accuracy) for name, by_k in results.items() for k, accuracy in by_k.items()]
    xs = on_axes(np.array([k for _, k, _ in points]), left, right, log=True)
    ys = on_axes(np.array([accuracy for _, _, accuracy in points]), bottom, top)
    colour = {"dino": np.array([31, 119, 180]), "random init": np.array([255, 127, 14])}  # matplotlib's first two
    for (name, k, accuracy), x, y in zip(points, xs, ys):
        other = "random init" if name == "dino" else "dino"
        assert colour_near(image, x, y, colour[name], radius=1), (name, k, accuracy)  # its marker is there
        assert not colour_near(image, x, y, colour[other], radius=1), (name, k, accuracy)
