"""Evaluation building blocks: k-NN parity with scikit-learn, clustering metrics, linear probe, labeled data."""

import itertools
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import KNeighborsClassifier

from unsupdistill.config import ConfigError
from unsupdistill.data import DataError, DigitsDataset, digits_split
from unsupdistill.data.labeled import LabeledImages, align_labels, load_labeled, training_labels
from unsupdistill.evaluate.clustering import cluster, hungarian_accuracy
from unsupdistill.evaluate.knn import knn_accuracy
from unsupdistill.evaluate.linear import DEFAULT_CS, dino_vit_features, linear_probe, select_regularisation


@pytest.fixture(scope="module")
def digits_pixels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 64 raw pixel values (0..255) and labels of the fixed digits train/test split."""
    train_idx, test_idx = digits_split()
    train, test = DigitsDataset(8, train_idx), DigitsDataset(8, test_idx)
    return train.gray.flatten(1), train.labels, test.gray.flatten(1), test.labels  # (N, 64) each


# ----------------------------------------------------------------------------------------------
# k-NN
# ----------------------------------------------------------------------------------------------


def test_knn_matches_scikit_learn_weighted_cosine_knn(digits_pixels):
    train_x, train_y, test_x, test_y = digits_pixels
    centre = lambda x: torch.nn.functional.normalize(x - x.mean(dim=1, keepdim=True), dim=1)  # noqa: E731
    train_x, test_x = centre(train_x), centre(test_x)
    ours = knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07)
    reference = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                                     weights=lambda d: np.exp((1 - d) / 0.07))
    reference.fit(train_x.numpy(), train_y.numpy())
    theirs = (reference.predict(test_x.numpy()) == test_y.numpy()).mean() * 100
    assert abs(ours - theirs) <= 0.5, (ours, theirs)
    assert ours > 90  # pixels of digits are easy: a broken vote would not get here


# ----------------------------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------------------------


def _brute_force_accuracy(labels: np.ndarray, assignments: np.ndarray) -> float:
    """Best accuracy over every one-to-one map of clusters to classes (clusters may outnumber classes)."""
    classes, clusters = np.unique(labels), np.unique(assignments)
    best = 0
    for targets in itertools.permutations(list(classes) + [-1] * max(0, len(clusters) - len(classes)),
                                          len(clusters)):
        mapping = dict(zip(clusters, targets))
        best = max(best, sum(mapping[c] == y for c, y in zip(assignments, labels)))
    return best / len(labels) * 100


@pytest.mark.parametrize("num_clusters", [3, 4])
def test_hungarian_accuracy_equals_brute_force(num_clusters):
    rng = np.random.default_rng(num_clusters)
    labels = rng.integers(0, 3, size=40)
    assignments = np.where(rng.random(40) < 0.6, (labels + 1) % 3, rng.integers(0, num_clusters, size=40))
    expected = _brute_force_accuracy(labels, assignments)
    assert hungarian_accuracy(labels, assignments) == pytest.approx(expected)
    assert expected < 100  # the example is not trivially perfect


def test_hungarian_accuracy_is_100_for_a_permuted_labelling():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    permuted = torch.tensor([2, 0, 3, 1])[labels]
    assert hungarian_accuracy(labels, permuted) == 100.0


def test_cluster_metrics_match_scikit_learn_and_separate_clear_clusters():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(30)
    centres = torch.eye(16)[:4] * 3  # four orthogonal directions: separable after L2 normalisation
    features = centres[labels] + 0.3 * torch.randn(len(labels), 16, generator=generator)
    result = cluster(features, labels, seeds=(0, 1), nredo=5)  # restarts: no seed ends in a local minimum
    assignments = result["assignments"].numpy()
    first = result["per_seed"][0]
    assert first["nmi"] == normalized_mutual_info_score(labels.numpy(), assignments)
    assert first["ari"] == adjusted_rand_score(labels.numpy(), assignments)
    assert first["accuracy"] == hungarian_accuracy(labels, assignments)
    assert result["num_clusters"] == 4 and len(result["per_seed"]) == 2
    assert result["accuracy"] == 100.0 and result["nmi"] == pytest.approx(1.0) and result["accuracy_std"] == 0.0


def test_cluster_of_noise_scores_near_chance():
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat_interleave(30)
    result = cluster(torch.randn(len(labels), 16, generator=generator), labels, seeds=(0,))
    assert result["nmi"] < 0.3 and result["accuracy"] < 60


# ----------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------


def test_linear_probe_on_digits_pixels(digits_pixels):
    train_x, train_y, test_x, test_y = digits_pixels
    result = linear_probe(train_x, train_y, test_x, test_y)
    assert result["top1"] >= 95, result
    assert result["top5"] >= result["top1"]  # 10 classes: top-5 is reported
    assert result["best_C"] in DEFAULT_CS and set(result["val_top1_by_C"]) == set(DEFAULT_CS)
    assert result["predictions"].shape == test_y.shape
    assert (result["predictions"] == test_y).float().mean().item() * 100 == pytest.approx(result["top1"])


def test_linear_probe_chooses_C_without_the_test_split(digits_pixels):
    train_x, train_y, test_x, test_y = digits_pixels
    Cs = (1e-3, 1e-1, 1e1)
    # the choice is a function of the train split alone ...
    best_C, val_top1 = select_regularisation(train_x, train_y, Cs=Cs)
    # ... so neither scrambled test labels nor other test features change it
    scrambled_y = test_y[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    scrambled = linear_probe(train_x, train_y, test_x[:100], scrambled_y, Cs=Cs)
    assert scrambled["best_C"] == best_C and scrambled["val_top1_by_C"] == val_top1
    assert scrambled["top1"] < 50
    assert "top5" in scrambled


# ----------------------------------------------------------------------------------------------
# DINO ViT features
# ----------------------------------------------------------------------------------------------


def test_dino_vit_features_shapes_and_class_token():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                            depth=3).eval()
    images = torch.randn(2, 3, 16, 16)
    dim = vit.num_features
    assert dino_vit_features(vit, images, 2, avgpool=False).shape == (2, 2 * dim)
    features = dino_vit_features(vit, images, 2, avgpool=True)
    assert features.shape == (2, 3 * dim)
    tokens = vit.forward_features(images)  # (B, 1 + 16, D) after the final norm
    torch.testing.assert_close(features[:, dim : 2 * dim], tokens[:, 0])  # last block's class token
    torch.testing.assert_close(features[:, 2 * dim :], tokens[:, 1:].mean(dim=1))


def test_dino_vit_features_rejects_a_resnet():
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    with pytest.raises(ConfigError, match="VisionTransformer"):
        dino_vit_features(resnet, torch.randn(1, 3, 16, 16), 1, avgpool=False)


# ----------------------------------------------------------------------------------------------
# Labeled data
# ----------------------------------------------------------------------------------------------


def _png(path: Path, value: int = 128, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def test_load_labeled_folder(tmp_path):
    _png(tmp_path / "dog" / "a.png", 10)
    _png(tmp_path / "cat" / "b.png", 20)
    _png(tmp_path / "dog" / "nested" / "c.png", 30)
    dataset = load_labeled(str(tmp_path), 8, "train")
    assert isinstance(dataset, LabeledImages)
    assert dataset.classes == ["cat", "dog"]
    assert dataset.labels.tolist() == [0, 1, 1] and dataset.labels.dtype == torch.int64
    assert [Path(p).name for p in dataset.paths] == ["b.png", "a.png", "c.png"]
    image = dataset[2]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and int(image[0, 4, 4]) == 30


def test_load_labeled_csv_with_relative_and_absolute_paths(tmp_path):
    _png(tmp_path / "images" / "x.png")
    absolute = _png(tmp_path / "elsewhere" / "y.png")
    _png(tmp_path / "images" / "z.png")
    csv = tmp_path / "set.csv"
    csv.write_text(f"path,label\nimages/x.png,zebra\n{absolute},ant\nimages/z.png,zebra\n")
    dataset = load_labeled(csv, 8, "test")
    assert dataset.classes == ["ant", "zebra"] and dataset.labels.tolist() == [1, 0, 1]
    assert dataset[1].shape == (3, 8, 8)


def test_load_labeled_digits_split():
    train, test = load_labeled("digits", 8, "train"), load_labeled("digits", 8, "test")
    assert (len(train), len(test)) == (1257, 540)
    assert train.classes == [str(d) for d in range(10)] and test[0].shape == (3, 8, 8)


def test_labeled_folder_with_an_empty_class_is_an_error(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    (tmp_path / "dog").mkdir()
    with pytest.raises(DataError, match="dog"):
        load_labeled(tmp_path, 8, "train")


def test_labeled_folder_with_one_class_is_an_error(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    with pytest.raises(DataError, match="only one class") as err:
        load_labeled(tmp_path, 8, "train")
    assert str(tmp_path) in str(err.value)


def test_labeled_folder_without_class_subfolders_is_an_error(tmp_path):
    _png(tmp_path / "a.png")
    with pytest.raises(DataError, match="no class subfolders"):
        load_labeled(tmp_path, 8, "train")
    with pytest.raises(DataError, match="does not exist"):
        load_labeled(tmp_path / "missing", 8, "train")


def test_labeled_csv_naming_a_missing_file_is_an_error(tmp_path):
    _png(tmp_path / "a.png")
    csv = tmp_path / "set.csv"
    csv.write_text("path,label\na.png,cat\nnot_there.png,dog\n")
    with pytest.raises(DataError) as err:
        load_labeled(csv, 8, "train")
    message = str(err.value)
    assert str(csv) in message and "not_there.png" in message and "line 3" in message


def test_labeled_csv_without_a_label_column_is_an_error(tmp_path):
    _png(tmp_path / "a.png")
    csv = tmp_path / "set.csv"
    csv.write_text("path,class\na.png,cat\n")
    with pytest.raises(DataError, match="'label'") as err:
        load_labeled(csv, 8, "train")
    assert str(csv) in str(err.value)
    csv.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_labeled(csv, 8, "train")


def test_labeled_csv_without_its_header_says_how_a_labeled_csv_is_written(tmp_path):
    """The header and where relative paths are read from were said nowhere; a CSV without the header named only the
    missing column."""
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    csv = tmp_path / "set.csv"
    csv.write_text("a.png,cat\nb.png,dog\n")
    with pytest.raises(DataError) as err:
        load_labeled(csv, 8, "train")
    message = str(err.value)
    assert str(csv) in message and "its first line is 'a.png,cat', an image's row: add the line path,label" in message
    assert "the header line path,label first" in message and f"read from the CSV's own folder ({tmp_path})" in message


def test_labeled_csv_giving_an_image_two_labels_is_refused_and_a_repeated_row_read_once(tmp_path, caplog):
    """The last of two rows of one image won silently (data.labels), or the image was scored twice (eval)."""
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    csv = tmp_path / "set.csv"
    csv.write_text("path,label\na.png,cat\nb.png,dog\n./a.png,dog\n")
    for read in (lambda: load_labeled(csv, 8, "train"),
                 lambda: training_labels(str(csv), SimpleNamespace(files=[tmp_path / "a.png", tmp_path / "b.png"]))):
        with pytest.raises(DataError) as err:
            read()
        message = str(err.value)
        assert str(csv) in message and f"{tmp_path / 'a.png'}: 'cat' on line 2, 'dog' on line 4" in message
    csv.write_text("path,label\na.png,cat\nb.png,dog\na.png,cat\n")
    with caplog.at_level(logging.WARNING):
        dataset = load_labeled(csv, 8, "train")
    assert [Path(path).name for path in dataset.paths] == ["a.png", "b.png"] and dataset.labels.tolist() == [0, 1]
    assert f"CSV {csv}: 1 rows repeat an image named above with the same label" in caplog.text


def test_unreadable_labeled_image_is_an_error_naming_it(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    broken = tmp_path / "dog" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_labeled(tmp_path, 8, "train")


def test_align_labels_maps_test_classes_to_train_indices(tmp_path):
    for name in ("ant", "bee", "cat"):
        _png(tmp_path / "train" / name / "a.png")
    for name in ("bee", "cat"):
        _png(tmp_path / "test" / name / "a.png")
    train, test = load_labeled(tmp_path / "train", 8, "train"), load_labeled(tmp_path / "test", 8, "test")
    assert test.labels.tolist() == [0, 1]
    assert align_labels(train, test).tolist() == [1, 2]
    _png(tmp_path / "test" / "dog" / "a.png")
    with pytest.raises(DataError, match="'dog'"):
        align_labels(train, load_labeled(tmp_path / "test", 8, "test"))
