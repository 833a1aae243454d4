"""A short real pretraining run must learn: k-NN on held-out digits beats the same network at random init.

Part of a random ResNet's k-NN gain comes free from BatchNorm: training replaces the running
statistics of initialisation with those of the data. So the pretrained teacher must also beat a
random network whose BatchNorm statistics were recalibrated on the same images (measured on 2026-12-04 with
recipes/digits.yaml's 12 epochs on the 1,257 training digits: 71.1 % random, 76.7 % random + recalibrated
BatchNorm, 83.5 % pretrained).
"""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unsupdistill.config import load_config
from unsupdistill.data import DigitsDataset, ImageFolderDataset, digits_split
from unsupdistill.evaluate import extract_features, knn_accuracy
from unsupdistill.evaluate.probe import KNNProbe
from unsupdistill.evaluate.run import EvalOptions, evaluate
from unsupdistill.methods import train
from unsupdistill.models.backbone import create_backbone
from unsupdistill.run_dir import read_metrics

pytestmark = pytest.mark.slow  # end-to-end runs


def write_pngs(indices, folder):
    folder.mkdir()
    digits = DigitsDataset(8, indices)  # the original 8x8 pixels
    for i in range(len(digits)):
        Image.fromarray(digits[i].permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return digits.labels


def test_pretrained_teacher_beats_random_init_by_5_knn_points(tmp_path):
    train_idx, test_idx = digits_split()
    train_labels = write_pngs(train_idx, tmp_path / "train")
    test_labels = write_pngs(test_idx, tmp_path / "test")

    # the built-in run's settings (recipes/digits.yaml, 12 epochs), pretrained on the train split only (228 steps),
    # with the k-NN probe of pretraining (eval.train/eval.test) at the end of the run
    config = load_config("digits", [f"data.path={tmp_path / 'train'}", "data.num_workers=0", "eval.train=digits",
                                    "eval.test=digits", "eval.every_epochs=12"])
    probe = KNNProbe(config, torch.device("cpu"))
    train(config, tmp_path / "run", probe=probe)

    size = config.model.input_size
    train_set, test_set = ImageFolderDataset(tmp_path / "train", size), ImageFolderDataset(tmp_path / "test", size)

    def knn(backbone):
        mean, std = config.model.mean, config.model.std
        train_features = extract_features(backbone, train_set, size, mean, std, progress=False)
        test_features = extract_features(backbone, test_set, size, mean, std, progress=False)
        return knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07)

    torch.manual_seed(config.train.seed)
    random_init, _ = create_backbone(config.model)
    trained, _ = create_backbone(config.model)
    trained.load_state_dict(load_file(tmp_path / "run" / "backbone.safetensors"))
    random_accuracy, trained_accuracy = knn(random_init), knn(trained)
    # the probe logged the pretrained network's k-NN, and the same probe scores random init 5 points lower
    [logged] = [m for m in read_metrics(tmp_path / "run")[0] if "knn_top1" in m]
    assert logged["step"] == 228 and logged["knn_top1"] == probe(trained)["knn_top1"]
    assert logged["knn_top1"] >= probe(random_init)["knn_top1"] + 5, (logged, probe(random_init))
    recalibrate_batchnorm(random_init, train_set, config)
    recalibrated_accuracy = knn(random_init)
    print(f"k-NN top-1 on held-out digits: random init {random_accuracy:.1f} %, with recalibrated BatchNorm "
          f"{recalibrated_accuracy:.1f} %, pretrained {trained_accuracy:.1f} %")
    assert trained_accuracy >= random_accuracy + 5
    assert trained_accuracy >= recalibrated_accuracy + 2

    # the evaluation pipeline (as `unsupdistill eval` runs it) on the same run: the pretrained teacher
    # beats `timm:` random init of the same architecture on k-NN, linear probe and NMI
    options = EvalOptions(image_size=size, cache=False, plots=False, cluster_seeds=(0, 1, 2))
    kwargs = ",".join(f"{k}={v}".replace(" ", "") for k, v in config.model.backbone_kwargs.items())
    baseline = evaluate(f"timm:{config.model.backbone},small_image_stem=true,{kwargs}", "digits", "digits", options)
    pretrained = evaluate(str(tmp_path / "run"), "digits", "digits", options)
    for result in (baseline, pretrained):
        print(result["model"], result["knn"][20]["top1"], result["linear"]["top1"], result["clustering"]["nmi"])
    assert baseline["feature_dim"] == pretrained["feature_dim"]
    assert pretrained["knn"][20]["top1"] > baseline["knn"][20]["top1"]
    assert pretrained["linear"]["top1"] > baseline["linear"]["top1"]
    assert pretrained["clustering"]["nmi"] > baseline["clustering"]["nmi"]


@torch.no_grad()
def recalibrate_batchnorm(model, dataset, config):
    """Forward passes in train mode (no gradients): BatchNorm running statistics come from the data."""
    mean = torch.tensor(config.model.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.model.std).view(1, 3, 1, 1)
    images = torch.stack([dataset[i] for i in range(len(dataset))]).float() / 255
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = images[torch.randperm(len(images), generator=generator)[:128]]
        model((batch - mean) / std)
    model.eval()
