"""Distillation with labels (method kd): the KD loss and the images its soft term covers, a labeled + unlabeled folder,
the built-in digits' labels, the teacher's head (fitted, or the teacher's own classifier mapped by class name), the
exported classifier (eval, embed), a resume with other classes, born-again generations with and without labels
(frozen teacher; resume after SIGKILL in generation 2 is in test_resume.py) and bad labels."""

import csv
import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import export_teacher, read_metrics
from PIL import Image
from safetensors.torch import load_file

from unsupdistill.cli import main
from unsupdistill.config import ConfigError, load_config
from unsupdistill.data import DataError, build_dataset, digits_split
from unsupdistill.data.labeled import training_labels
from unsupdistill.evaluate.features import NormalizedBackbone
from unsupdistill.evaluate.run import classifier_accuracy
from unsupdistill.export.formats import parity_images
from unsupdistill.losses import KDLoss
from unsupdistill.methods import build_trainer
from unsupdistill.methods.kd.method import KnowledgeDistillation
from unsupdistill.models.classifier import Classifier
from unsupdistill.models.load import load_model
from unsupdistill.models.teachers import load_teacher
from unsupdistill.storage import load_checkpoint, save_checkpoint, save_classifier
from unsupdistill.train.method import Runtime

CLASSES = ("blue", "green", "red")
STUDENT = ["model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}", "model.input_size=12",
           "train.batch_size=16", "data.num_workers=0", "train.log_every_steps=1", "optim.lr=0.3",
           "train.epochs=12", "distill.cache=off", "train.threads=1"]


def tinted(rng: np.random.Generator, label: int) -> Image.Image:
    """A 20x20 image of random blocks, tinted towards one colour channel (the class)."""
    blocks = rng.integers(0, 200, (5, 5, 3)).astype(np.int64)
    blocks[..., 2 - label] += 55  # CLASSES are sorted: blue (channel 2), green (1), red (0)
    return Image.fromarray(blocks.astype(np.uint8)).resize((20, 20), Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """``pool``: 16 images per class, unsorted; ``labels.csv``: 8 of each class labeled; ``test``: class folders."""
    root = tmp_path_factory.mktemp("kd")
    rng = np.random.default_rng(0)
    pool, test = root / "pool", root / "test"
    pool.mkdir()
    rows = []
    for label, name in enumerate(CLASSES):
        for i in range(16):
            path = pool / f"{i:02d}_{name}.png"
            tinted(rng, label).save(path)
            if i < 8:
                rows.append([f"pool/{path.name}", name])
        (test / name).mkdir(parents=True)
        for i in range(10):
            tinted(rng, label).save(test / name / f"{i}.png")
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *rows])
    teacher = export_teacher(root / "teacher", 16, seed=0)
    return {"root": root, "pool": pool, "test": test, "labels": labels, "teacher": teacher}


def kd(out: Path, data: dict, *args: str, labels: Path | None = None, teacher: Path | None = None) -> int:
    return main(["distill", str(data["pool"]), "--out", str(out), "--teacher", str(teacher or data["teacher"]),
                 "--labels", str(labels or data["labels"]), *STUDENT, *args])


def test_kd_loss_is_hintons_equation():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    alpha, t = 0.3, 2.5
    s, te = student.double().numpy(), teacher.double().numpy()

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    hard = -np.mean(np.log(softmax(s)[np.arange(6), labels.numpy()]))
    p, q = softmax(te / t), softmax(s / t)
    soft = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))  # KL(teacher || student), averaged over the batch
    expected = (1 - alpha) * hard + alpha * t * t * soft
    assert KDLoss(alpha, t)(student, teacher, labels).item() == pytest.approx(expected, rel=1e-5)
    assert KDLoss(0.0, t)(student, teacher, labels).item() == pytest.approx(hard, rel=1e-5)  # labels only
    # images without a label (-1) join the soft term only: the hard term averages over the labeled ones
    partial = torch.tensor([0, -1, 2, -1, -1, 1])
    known = partial.numpy() >= 0
    hard_known = -np.mean(np.log(softmax(s)[known.nonzero()[0], partial.numpy()[known]]))
    expected = (1 - alpha) * hard_known + alpha * t * t * soft
    assert KDLoss(alpha, t)(student, teacher, partial).item() == pytest.approx(expected, rel=1e-5)
    none = torch.full((6,), -1)
    assert KDLoss(alpha, t)(student, teacher, none).item() == pytest.approx(alpha * t * t * soft, rel=1e-5)


@pytest.fixture(scope="module")
def kd_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kd_run") / "run"
    assert kd(out, data, "eval.summary=true", "--probe-train", str(data["labels"]), "--probe-test",
              str(data["test"])) == 0
    return out


@pytest.mark.slow
def test_labeled_and_unlabeled_images_train_a_classifier_above_random_init(kd_run):
    config = (kd_run / "config.yaml").read_text()
    assert "method: kd" in config and "kd:" in config and "\ndino:" not in config
    summary = json.loads((kd_run / "summary.json").read_text())
    knn = summary["knn_top1"]
    assert summary["classifier_top1"] >= 70, summary  # 3 classes: chance is 33 %
    assert knn["this run"] > knn["same network, random init"], knn
    metrics = read_metrics(kd_run)
    assert all(math.isfinite(m["kd_loss"]) for m in metrics if "kd_loss" in m)
    # half of the pool is labeled, the rest still trains the features (the last training record: --probe-train sets
    # eval.train, whose k-NN probe logs a record of its own after it)
    assert 0 < [m for m in metrics if "labeled_share" in m][-1]["labeled_share"] < 1
    assert json.loads((kd_run / "classifier.json").read_text())["classes"] == list(CLASSES)


@pytest.mark.slow
def test_eval_and_embed_use_the_exported_classifier(kd_run, data, tmp_path):
    assert main(["eval", str(kd_run), "--train", str(data["labels"]), "--test", str(data["test"]), "--no-linear",
                 "--no-clustering", "--no-plots", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    summary = json.loads((kd_run / "summary.json").read_text())
    assert result["classifier"]["top1"] == pytest.approx(summary["classifier_top1"])
    assert main(["embed", str(kd_run), str(data["test"]), "--out", str(tmp_path / "f.npy"), "--top-k", "2"]) == 0
    with open(tmp_path / "f.predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and set(rows[0]) == {"row", "path", "class_1", "prob_1", "class_2", "prob_2"}
    truth = [Path(r["path"]).parent.name for r in rows]
    hits = sum(r["class_1"] == t for r, t in zip(rows, truth))
    assert hits / len(rows) * 100 == pytest.approx(result["classifier"]["top1"])  # the same classifier, same images


def test_the_classifiers_top5_holds_its_top1_when_logits_tie():
    """A classifier whose 8 logits all tie: argmax picks class 0, torch's topk(5) picks others; top-5 counts the top-1
    class as the k-NN and the probe do, so it is never below top-1."""
    classifier = Classifier(4, [f"c{i}" for i in range(8)])
    torch.nn.init.zeros_(classifier.weight), torch.nn.init.zeros_(classifier.bias)
    scores = classifier_accuracy(classifier, torch.randn(10, 4), classifier.classes, torch.zeros(10, dtype=torch.long))
    assert scores["top1"] == 100.0 and scores["top5"] == 100.0


def test_the_teacher_head_is_fitted_on_the_training_labels_only(data, tmp_path, monkeypatch):
    seen = {}

    def grid(train_x, train_y, test_x, test_y, **kwargs):
        seen.update(rows=len(train_x), labels=train_y.clone(), test_rows=len(test_x))
        return {"val_top1": [{"top1": 50.0}],
                "linear": (torch.zeros(len(CLASSES), train_x.shape[1]), torch.zeros(len(CLASSES)))}

    monkeypatch.setattr("unsupdistill.methods.kd.method.linear_probe_grid", grid)
    config = load_config(None, ["method=kd", f"distill.teacher={data['teacher']}", f"data.path={data['pool']}",
                                f"data.labels={data['labels']}", *STUDENT])
    method = KnowledgeDistillation(config, Runtime(torch.device("cpu"), None, 1, tmp_path))
    dataset = build_dataset(config.data, method.image_size)
    labels = training_labels(config.data.labels, dataset)
    method.setup(dataset, labels)
    assert labels.labeled == 24 and seen["rows"] == seen["test_rows"] == 24  # the labeled images, nothing else
    names = [Path(f).name for f in dataset.files]
    expected = [CLASSES.index(n.split("_")[1][:-4]) for n in names if int(n[:2]) < 8]
    assert seen["labels"].tolist() == expected


def kd_method(data: dict, tmp_path: Path, *overrides: str, labels: Path | None = None,
              teacher: Path | None = None) -> KnowledgeDistillation:
    """The kd method on the pool with its training labels, set up (no step trained)."""
    config = load_config(None, ["method=kd", f"distill.teacher={teacher or data['teacher']}",
                                f"data.path={data['pool']}", f"data.labels={labels or data['labels']}", *STUDENT,
                                *overrides])
    method = KnowledgeDistillation(config, Runtime(torch.device("cpu"), None, 1, tmp_path))
    dataset = build_dataset(config.data, method.image_size)
    method.setup(dataset, training_labels(config.data.labels, dataset))
    return method


def test_a_teachers_classifier_is_mapped_onto_the_labels_classes_by_name(data, tmp_path, monkeypatch):
    """A teacher whose classifier knows more classes than the labels, in another order (red, purple, blue, green):
    its class probabilities come from its rows for the labels' classes, in the labels' order; labels of only some of
    its classes (blue, red) take those rows alone. No head is fitted."""
    monkeypatch.setattr(KnowledgeDistillation, "_fit_teacher_head",
                        lambda *args: pytest.fail("a head was fitted for a teacher with a classifier"))
    teacher = tmp_path / "teacher"
    shutil.copytree(data["teacher"].parent, teacher)
    own = Classifier(32, ["red", "purple", "blue", "green"])  # over the teacher's 32-d features
    torch.nn.init.normal_(own.weight), torch.nn.init.normal_(own.bias)
    own.requires_grad_(False)
    save_classifier(own.weight, own.bias, own.classes, teacher)
    features = torch.randn(5, 32)
    subset = write_rows(tmp_path / "blue_red.csv", [[str(data["pool"] / f"{i:02d}_{name}.png"), name]
                                                     for name in ("blue", "red") for i in range(8)])
    for labels, rows in ((data["labels"], [2, 3, 0]), (subset, [2, 0])):
        method = kd_method(data, tmp_path / labels.stem, labels=labels, teacher=teacher / data["teacher"].name)
        head = method.teacher_classifier
        assert method.teacher_head_source == "the teacher's own classifier (4 classes)"
        assert head.classes == [own.classes[r] for r in rows] == method.student.classifier.classes
        assert torch.equal(head.weight, own.weight[rows]) and torch.equal(head.bias, own.bias[rows])
        with torch.no_grad():
            torch.testing.assert_close(head(features), own(features)[:, rows])


@pytest.mark.parametrize("soft_images", ["all", "labeled"])
def test_soft_images_chooses_the_images_of_the_soft_term(data, tmp_path, monkeypatch, soft_images):
    """kd.soft_images=all: the KD loss sees every image of the batch (the unlabeled ones, label -1, join its soft
    term); labeled: only the labeled images, with the teacher's and the student's logits of the same images."""
    seen = []
    forward = KDLoss.forward

    def spy(self, student, teacher, labels):
        assert student.shape == teacher.shape == (len(labels), len(CLASSES))
        seen.append(labels.clone())
        return forward(self, student, teacher, labels)

    monkeypatch.setattr(KDLoss, "forward", spy)
    config = load_config(None, ["method=kd", f"distill.teacher={data['teacher']}", f"data.path={data['pool']}",
                                f"data.labels={data['labels']}", *STUDENT, "train.max_steps=3",
                                f"kd.soft_images={soft_images}"])
    build_trainer(config, tmp_path / "run").fit()
    shares = [m["labeled_share"] for m in read_metrics(tmp_path / "run")]
    assert len(seen) == len(shares) == 3 and all(0 < share < 1 for share in shares)  # every batch has both kinds
    for labels, share in zip(seen, shares):
        if soft_images == "all":
            assert len(labels) == 16 and (labels >= 0).float().mean().item() == share
        else:
            assert (labels >= 0).all() and len(labels) == round(16 * share)


def test_under_torchrun_process_0_fits_the_teacher_head_and_the_others_take_it(data, tmp_path, monkeypatch):
    """Every process trains with one head: process 0 fits it and broadcasts it; another process fits nothing."""
    config = load_config(None, ["method=kd", f"distill.teacher={data['teacher']}", f"data.path={data['pool']}",
                                f"data.labels={data['labels']}", *STUDENT])
    method = KnowledgeDistillation(config, Runtime(torch.device("cpu"), None, 1, tmp_path))
    dataset = build_dataset(config.data, method.image_size)
    width = method.teacher.feature_dim
    sent = (torch.randn(len(CLASSES), width), torch.randn(len(CLASSES)), 61.0)
    received = []

    def broadcast(obj):
        received.append(obj)
        return sent

    def fit(*args):
        raise AssertionError("a process other than the first fitted a teacher head")

    monkeypatch.setattr("unsupdistill.methods.kd.method.distributed", SimpleNamespace(is_main_process=lambda: False,
                                                                               broadcast_object=broadcast))
    monkeypatch.setattr(KnowledgeDistillation, "_fit_teacher_head", fit)
    method.setup(dataset, training_labels(config.data.labels, dataset))
    assert received == [None]
    head = method.teacher_classifier
    assert torch.equal(head.weight, sent[0]) and torch.equal(head.bias, sent[1])
    assert "61.0 % on a held-out fifth" in method.describe()


def test_a_resume_with_labels_of_other_classes_is_refused(data, tmp_path, caplog):
    """The student's classifier has a row per class of the run's labels: a resume with labels of other classes (blue
    and red only) is refused before any step, naming both; its checkpoint, metrics and export stay as they were, and
    it resumes with its own labels."""
    out = tmp_path / "run"
    assert kd(out, data, "train.max_steps=2") == 0
    exported = (out / "backbone.safetensors").read_bytes()
    other = write_rows(tmp_path / "blue_red.csv", [[str(data["pool"] / f"{i:02d}_{name}.png"), name]
                                                    for name in ("blue", "red") for i in range(8)])
    assert main(["distill", "--resume", str(out), "--labels", str(other), "train.max_steps=3"]) == 2
    assert (f"the checkpoint was trained on classes ['blue', 'green', 'red'], but data.labels={other} gives "
            "['blue', 'red']; resume with the run's own data.labels") in caplog.text
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2 and len(read_metrics(out)) == 2
    assert (out / "backbone.safetensors").read_bytes() == exported
    assert main(["distill", "--resume", str(out), "train.max_steps=3"]) == 0
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3]


@pytest.fixture(scope="module")
def chain(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chain") / "born_again"
    assert kd(out, data, "--generations", "2") == 0
    return out


@pytest.mark.slow
def test_generations_learn_from_the_one_before_and_end_with_one_table(chain, caplog):
    assert (chain / "gen_1" / "classifier.safetensors").is_file() and (chain / "gen_2" / "backbone.json").is_file()
    gen2 = (chain / "gen_2" / "config.yaml").read_text()
    assert f"teacher: {chain / 'gen_1'}" in gen2
    assert json.loads((chain / "status.json").read_text())["state"] == "done"
    table = (chain / "generations.md").read_text()
    assert "gen_1" in table and table.count("\n") >= 4  # header, rule, two generations
    # each generation's row says where its training ended, from its own metrics.jsonl, with or without test sets
    for k in (1, 2):
        last = read_metrics(chain / f"gen_{k}")[-1]
        row = next(line for line in table.splitlines() if f"{chain / f'gen_{k}'} " in line)
        assert f"{last['loss']:.4f}" in row and f"{last['teacher_agreement']:.2f}" in row
    # a resume of the chain takes its own config: a flag that would change it is refused, by name
    assert main(["distill", "--resume", str(chain), "--batch-size", "8"]) == 2
    assert "--batch-size" in caplog.text and "generations.json" in caplog.text


def reordered_copy(run: Path, folder: Path, order: list[str]) -> Path:
    """``run``'s exported backbone in ``folder`` with its classifier's rows in the class order ``order``: the same
    classifier, other indices."""
    folder.mkdir()
    for name in ("backbone.safetensors", "backbone.json"):
        shutil.copy(run / name, folder / name)
    own = load_model(str(run)).classifier
    rows = [own.classes.index(name) for name in order]
    save_classifier(own.weight[rows], own.bias[rows], order, folder)
    return folder / "backbone.safetensors"


@pytest.mark.slow
def test_a_generations_teacher_is_frozen_and_bit_identical_after_training(chain, data, tmp_path):
    """Generation 1 as the teacher, its classifier's classes stored in another order (red, blue, green): the
    teacher's class probabilities are mapped onto the labels' classes by name, so the head is generation 1's own."""
    teacher = reordered_copy(chain / "gen_1", tmp_path / "teacher", ["red", "blue", "green"])
    before = {name: hashlib.sha256((teacher.parent / name).read_bytes()).hexdigest()
              for name in ("backbone.safetensors", "classifier.safetensors")}
    config = load_config(None, ["method=kd", f"distill.teacher={teacher}", f"data.path={data['pool']}",
                                f"data.labels={data['labels']}", *STUDENT, "train.max_steps=4"])
    trainer = build_trainer(config, tmp_path / "gen")
    method = trainer.method
    assert method.teacher_head_source == "the teacher's own classifier (3 classes)"
    frozen = {k: v.clone() for k, v in method.teacher.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in method.teacher_classifier.state_dict().items()}
    trainer.fit()
    assert not any(p.requires_grad for p in method.teacher.backbone.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in method.teacher.backbone.state_dict().items())
    assert all(torch.equal(v, head[k]) for k, v in method.teacher_classifier.state_dict().items())
    fresh = load_teacher(str(teacher))
    assert all(torch.equal(v, fresh.backbone.state_dict()[k]) for k, v in frozen.items())
    assert method.teacher_classifier.classes == list(CLASSES)
    original = load_model(str(chain / "gen_1")).classifier  # blue, green, red
    assert torch.equal(head["weight"], original.weight) and torch.equal(head["bias"], original.bias)
    assert before == {name: hashlib.sha256((teacher.parent / name).read_bytes()).hexdigest() for name in before}


def test_generations_without_labels_distill_each_from_the_one_before(data, tmp_path):
    """Born-again generations of plain distillation (no labels): generation 2's teacher is generation 1's exported
    student (its 16-d features, not the first teacher's 32-d ones); no classifier anywhere."""
    out = tmp_path / "born_again"
    assert main(["distill", str(data["pool"]), "--out", str(out), "--teacher", str(data["teacher"]), "--generations",
                 "2", *STUDENT, "train.max_steps=2"]) == 0
    for k, teacher, width in ((1, data["teacher"], 32), (2, out / "gen_1", 16)):
        state = load_checkpoint(out / f"gen_{k}" / "checkpoints" / "last.pt")
        assert state["method"] == "distill" and state["config"]["distill"]["teacher"] == str(teacher)
        assert state["distill_teacher"]["key"] == load_teacher(str(teacher)).cache_key
        assert state["distill_teacher"]["feature_dim"] == width and state["student"]["head.weight"].shape == (width, 16)
        assert not (out / f"gen_{k}" / "classifier.safetensors").exists()
    table = (out / "generations.md").read_text()
    assert "gen_1" in table and table.count("\n") == 4  # header, rule, two generations
    assert json.loads((out / "status.json").read_text())["state"] == "done"


def test_digits_labels_label_the_train_split_of_the_built_in_digits(data, tmp_path):
    """data.labels=digits: the built-in digits' own labels on their train split, the test split unlabeled (the
    end-of-run scores on it stay honest); kd trains on them with the classes "0" to "9"."""
    config = load_config(None, ["data.labels=digits"])
    dataset = build_dataset(config.data, 12)
    labels = training_labels("digits", dataset)
    train, test = digits_split()
    assert labels.classes == [str(i) for i in range(10)] and labels.labeled == len(train)
    assert torch.equal(labels.labels[train], dataset.labels[train]) and (labels.labels[test] == -1).all()
    out = tmp_path / "run"
    assert main(["distill", "--out", str(out), "--teacher", str(data["teacher"]), "--labels", "digits", *STUDENT,
                 "train.max_steps=2", "eval.summary=false"]) == 0  # no end-of-run scores of three networks
    assert json.loads((out / "classifier.json").read_text())["classes"] == [str(i) for i in range(10)]
    assert 0 < read_metrics(out)[-1]["labeled_share"] < 1
    with pytest.raises(DataError, match="data.labels=digits labels the built-in digits only"):
        training_labels("digits", build_dataset(load_config(None, [f"data.path={data['pool']}"]).data, 12))


# ----------------------------------------------------------------------------------------------
# Resuming born-again generations: what a resume takes, refuses and writes
# ----------------------------------------------------------------------------------------------


def files_of(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def short_chain(data, tmp_path_factory) -> Path:
    """Two finished generations of one step each."""
    out = tmp_path_factory.mktemp("short_chain") / "born_again"
    assert kd(out, data, "--generations", "2", "train.max_steps=1") == 0
    return out


@pytest.mark.parametrize("left", ["gen_2 not started", "gen_2 interrupted", "all done, --generations 3"])
def test_a_dry_run_of_resumed_generations_tries_the_next_one_and_writes_nothing(short_chain, left, tmp_path, capsys,
                                                                               caplog):
    root = tmp_path / "born_again"
    shutil.copytree(short_chain, root)
    args = ["distill", "--resume", str(root), "--dry-run"]
    if left == "gen_2 not started":
        shutil.rmtree(root / "gen_2")
        tried = f"dry run of generation 2 of 2 in {root / 'gen_2'} (teacher {root / 'gen_1'})"
    elif left == "gen_2 interrupted":  # its checkpoint, no export yet
        (root / "gen_2" / "backbone.safetensors").unlink()
        tried = f"dry run of generation 2 of 2 in {root / 'gen_2'} (teacher {root / 'gen_1'}, from {root / 'gen_2'}"
    else:
        args += ["--generations", "3"]
        tried = f"dry run of generation 3 of 3 in {root / 'gen_3'} (teacher {root / 'gen_2'})"
    before = files_of(root)
    capsys.readouterr()
    caplog.set_level("INFO")
    assert main(args) == 0
    assert '"dry_run": "ok"' in capsys.readouterr().out and tried in caplog.text
    assert files_of(root) == before


@pytest.mark.parametrize("flag", ["--teacher", "--labels", "--out", "--generations"])
def test_resuming_generations_refuses_a_flag_it_would_drop_by_name(short_chain, data, flag, tmp_path, caplog):
    value = {"--teacher": str(data["teacher"]), "--labels": str(data["labels"]), "--out": str(tmp_path / "elsewhere"),
             "--generations": "1"}[flag]
    expected = {"--teacher": ["keep their own teacher", f"--teacher {value} --generations N --out NEW_DIR"],
                "--labels": ["keep their own labels", f"--labels {value} --generations N --out NEW_DIR"],
                "--out": ["go on in their own folder", "Drop --out"],
                "--generations": ["plans 2 generations", "not lower it", "give 2 or more"]}[flag]
    before = files_of(short_chain)
    assert main(["distill", "--resume", str(short_chain), flag, value]) == 2
    for text in [f"{flag} {value} with --resume {short_chain}", *expected]:
        assert text in caplog.text, (text, caplog.text[-2000:])
    assert files_of(short_chain) == before and not (tmp_path / "elsewhere").exists()


def test_resuming_generations_with_a_larger_number_trains_the_next_from_the_last(short_chain, tmp_path):
    root = tmp_path / "born_again"
    shutil.copytree(short_chain, root)
    gen_2 = hashlib.sha256((root / "gen_2" / "backbone.safetensors").read_bytes()).hexdigest()
    assert main(["distill", "--resume", str(root), "--generations", "3"]) == 0
    assert json.loads((root / "generations.json").read_text())["generations"] == 3
    assert f"teacher: {root / 'gen_2'}" in (root / "gen_3" / "config.yaml").read_text()
    assert (root / "gen_3" / "classifier.safetensors").is_file() and "gen_3" in (root / "generations.md").read_text()
    assert hashlib.sha256((root / "gen_2" / "backbone.safetensors").read_bytes()).hexdigest() == gen_2


def test_resume_with_generations_of_a_single_run_is_refused_and_keeps_the_run(data, tmp_path, caplog):
    run = tmp_path / "run"
    assert main(["distill", str(data["pool"]), "--out", str(run), "--teacher", str(data["teacher"]), *STUDENT,
                 "train.max_steps=1"]) == 0
    before = files_of(run)
    assert main(["distill", "--resume", str(run), "--generations", "2"]) == 2
    for text in [f"--generations 2 with --resume {run}", "no generations.json", "nothing was changed",
                 f"--teacher {run}"]:
        assert text in caplog.text, (text, caplog.text[-2000:])
    assert files_of(run) == before


GOOD_RECORD = {"generations": 2, "config": {}, "automatic": True, "overrides": [], "pair": None}


@pytest.mark.parametrize("text, problem", [
    (json.dumps(GOOD_RECORD)[:30], "does not read as JSON (JSONDecodeError"),
    ("[]", "it holds a JSON list, not an object"),
    (json.dumps({k: v for k, v in GOOD_RECORD.items() if k != "config"}), "key 'config' is missing"),
    (json.dumps(GOOD_RECORD | {"generations": "two"}), "key 'generations' is 'two'; expected an integer >= 1"),
], ids=["truncated", "a list", "no config", "generations not a number"])
def test_a_broken_generations_record_is_named_with_what_to_do(text, problem, tmp_path, caplog):
    root = tmp_path / "born_again"
    root.mkdir()
    (root / "generations.json").write_text(text)
    assert main(["distill", "--resume", str(root)]) == 2
    for expected in [f"{root / 'generations.json'} is not a readable generations record", problem,
                     "restore it from a copy", f"unsupdistill distill --resume {root}/gen_K"]:
        assert expected in caplog.text, (expected, caplog.text[-2000:])
    assert [p.name for p in root.iterdir()] == ["generations.json"]


# ----------------------------------------------------------------------------------------------
# A teacher and labels that cannot be used
# ----------------------------------------------------------------------------------------------


def test_kd_needs_a_teacher_as_distillation_does():
    with pytest.raises(ConfigError, match="distill.teacher: expected a teacher when method=kd"):
        load_config(None, ["method=kd", "data.labels=digits"])
    with pytest.raises(ConfigError, match="distill.teacher: expected a teacher when method=distill"):
        load_config(None, ["method=distill"])
    load_config(None, ["method=dino"])  # DINO reads no distill section: no teacher needed


def write_rows(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *rows])
    return path


@pytest.mark.parametrize("case", ["empty class", "missing file", "outside data.path",
                                  pytest.param("label outside the classes", marks=pytest.mark.slow)])  # generations
def test_bad_labels_fail_before_training_with_the_file_and_the_fix(case, data, tmp_path, caplog, request):
    teacher, labels, folder = data["teacher"], None, data["pool"]
    if case == "empty class":
        folder = tmp_path / "labeled"
        for name in CLASSES:
            (folder / name).mkdir(parents=True)
        rng = np.random.default_rng(1)
        for name in CLASSES[:2]:
            for i in range(10):  # more than a batch: the labels are what fails
                tinted(rng, 0).save(folder / name / f"{i}.png")
        labels, expected = folder, [f"class folder {folder / 'red'}", "holds no images"]
    elif case == "missing file":
        labels = write_rows(data["root"] / "missing.csv", [["pool/00_blue.png", "blue"], ["pool/nope.png", "red"]])
        expected = [str(labels), "line 3", "do not exist"]
    elif case == "outside data.path":
        labels = write_rows(tmp_path / "outside.csv", [[str(data["test"] / "red" / "0.png"), "red"],
                                                       [str(data["pool"] / "00_blue.png"), "blue"]])
        expected = [str(data["test"] / "red" / "0.png"), "put the labeled images inside data.path"]
    else:
        teacher = request.getfixturevalue("chain") / "gen_1"  # a classifier over blue, green, red
        labels = write_rows(data["root"] / "purple.csv", [["pool/00_blue.png", "blue"], ["pool/01_red.png", "purple"]])
        expected = ["'purple'", "teacher's classifier does not know", "Label with those classes"]
    out = tmp_path / "run"
    args = ["distill", str(folder), "--out", str(out), "--teacher", str(teacher), "--labels", str(labels), *STUDENT]
    assert main(args) == 2
    for text in expected:
        assert text in caplog.text, (text, caplog.text[-2000:])
    assert not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# The classifier that belongs to the weights: an epoch checkpoint's own, a ViT's with --vit-blocks, exports
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kd_epochs(data, tmp_path_factory) -> Path:
    """A kd run of 2 epochs (3 steps each) that keeps a checkpoint of every epoch."""
    out = tmp_path_factory.mktemp("kd_epochs") / "run"
    assert kd(out, data, "train.epochs=2", "train.keep_every_epochs=1") == 0
    return out


def test_an_epoch_checkpoint_brings_its_own_classifier_to_eval_embed_and_a_teacher(kd_epochs, data, tmp_path):
    epoch = kd_epochs / "checkpoints" / "epoch_0001.pt"
    state = load_checkpoint(epoch)
    weight, bias = (state[state["exported"]][f"classifier.{name}"] for name in ("weight", "bias"))
    assert not torch.equal(weight, load_file(kd_epochs / "classifier.safetensors")["weight"])  # trained on since
    assert torch.equal(load_teacher(str(epoch)).classifier.weight, weight)
    assert load_model(str(epoch)).classifier.classes == list(CLASSES)

    assert main(["embed", str(epoch), str(data["test"]), "--out", str(tmp_path / "embed"), "--top-k", "1"]) == 0
    features = torch.from_numpy(np.load(tmp_path / "embed" / "features.npy"))  # (30, D)
    probs = (features @ weight.T + bias).softmax(dim=1)  # (30, C)
    with open(tmp_path / "embed" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class_1"] for r in rows] == [CLASSES[i] for i in probs.argmax(1)]
    assert [float(r["prob_1"]) for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-4)

    assert main(["eval", str(epoch), "--eval-train", str(data["labels"]), "--eval-test", str(data["test"]),
                 "--no-linear", "--no-clustering", "--no-plots", "--no-cache", "--out", str(tmp_path / "eval")]) == 0
    truth = torch.tensor([CLASSES.index(Path(r["path"]).parent.name) for r in rows])
    top1 = (probs.argmax(1) == truth).double().mean().item() * 100
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["classifier"]["top1"] == pytest.approx(top1)


def test_a_checkpoint_without_a_classifier_gets_none_and_says_so(kd_epochs, tmp_path, caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("classifier.safetensors", "classifier.json"):
        shutil.copy(kd_epochs / name, run / name)
    state = load_checkpoint(kd_epochs / "checkpoints" / "epoch_0001.pt")
    state["student"] = {k: v for k, v in state["student"].items() if not k.startswith("classifier.")}  # an older one
    save_checkpoint(state, run / "checkpoints" / "epoch_0001.pt")
    assert load_model(str(run / "checkpoints" / "epoch_0001.pt")).classifier is None
    assert "holds no classifier" in caplog.text and "belongs to its final export" in caplog.text


def test_resuming_from_an_epoch_checkpoint_sets_the_final_classifier_aside_with_its_backbone(kd_epochs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(kd_epochs, run)
    final = files_of(run)
    assert main(["distill", "--resume", str(run / "checkpoints" / "epoch_0001.pt")]) == 0
    (aside,) = (run / "superseded").iterdir()
    for name in ("backbone.safetensors", "classifier.safetensors", "classifier.json"):
        assert files_of(aside)[name] == final[name], name  # the export the resumed run replaces, kept whole
    assert (run / "classifier.safetensors").is_file()


VIT = ["model.backbone=vit_tiny_patch16_224", "model.small_image_stem=false",
       "model.backbone_kwargs={img_size: 12, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"]


@pytest.fixture(scope="module")
def kd_vit(data, tmp_path_factory) -> Path:
    """A tiny ViT student distilled with labels, 2 epochs, a checkpoint of each."""
    out = tmp_path_factory.mktemp("kd_vit") / "run"
    assert kd(out, data, *VIT, "train.epochs=2", "train.keep_every_epochs=1") == 0
    return out


@pytest.mark.parametrize("model", ["checkpoints/epoch_0001.pt", "backbone.safetensors"])
def test_eval_vit_blocks_and_avgpool_on_a_vit_checkpoint_and_export(kd_vit, data, model, tmp_path, caplog):
    spec = str(kd_vit / model)
    labeled = ["--eval-train", str(data["labels"]), "--eval-test", str(data["test"]), "--no-linear",
               "--no-clustering", "--no-plots", "--no-cache"]

    def evaluate(*flags: str) -> dict:
        out = tmp_path / "-".join(flags or ("pooled",))
        assert main(["eval", spec, *labeled, *flags, "--out", str(out)]) == 0
        return json.loads((out / "eval.json").read_text())

    pooled = evaluate()
    assert pooled["feature_dim"] == 32 and "top1" in pooled["classifier"]
    for flags, width in [(("--vit-blocks", "2"), 64), (("--vit-blocks", "1", "--avgpool"), 64),
                         (("--vit-blocks", "2", "--avgpool"), 96)]:
        result = evaluate(*flags)
        assert result["feature_dim"] == width, flags  # the k-NN reads the concatenated tokens
        assert result["classifier"] == pooled["classifier"], flags  # the classifier its pooled features
    assert main(["eval", spec, *labeled, "--avgpool", "--out", str(tmp_path / "avgpool")]) == 2
    assert "--avgpool appends" in caplog.text and "give --vit-blocks N with it" in caplog.text


def test_export_keeps_the_classifier_and_its_logits_match_pytorch(kd_vit, data, tmp_path):
    """ONNX gets a second output, TorchScript a logits method, safetensors a classifier file beside the backbone;
    each gives PyTorch's class scores, and the features as before. (The tiny ViT: its ONNX export takes about half
    the tiny ResNet's 20 s.)"""
    import onnxruntime

    model = load_model(str(kd_vit))
    images, _ = parity_images(str(data["test"]), model, count=5)  # (5, 3, S, S) in [0, 1]
    network = NormalizedBackbone(model.backbone, model.mean, model.std).eval()
    with torch.no_grad():
        features = network(images)  # (5, D)
        logits = model.classifier(features)  # (5, C)
    for fmt in ("onnx", "torchscript", "safetensors"):
        assert main(["export", str(kd_vit), "--format", fmt, "--out", str(tmp_path)]) == 0

    def close(got, want) -> bool:
        got = torch.as_tensor(np.asarray(got))
        return got.shape == want.shape and (got - want).abs().max().item() <= 1e-4 + 1e-3 * want.abs().max().item()

    onnx_meta = json.loads((tmp_path / "student.onnx.json").read_text())
    assert onnx_meta["classes"] == list(CLASSES) and onnx_meta["output_names"] == ["features", "logits"]
    assert onnx_meta["logits_parity"]["max_abs_error"] <= onnx_meta["logits_parity"]["tolerance"]
    session = onnxruntime.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    got_features, got_logits = session.run(["features", "logits"], {"images": images.numpy()})
    assert close(got_features, features) and close(got_logits, logits)
    assert close(session.run(["features"], {"images": images.numpy()})[0], features)  # as for a model without one

    scripted = torch.jit.load(str(tmp_path / "student.torchscript.pt"))
    assert json.loads((tmp_path / "student.torchscript.pt.json").read_text())["classes"] == list(CLASSES)
    with torch.no_grad():
        assert close(scripted(images), features) and close(scripted.logits(images), logits)

    meta = json.loads((tmp_path / "student.json").read_text())
    assert meta["classifier"] == "student.classifier.safetensors" and meta["classes"] == list(CLASSES)
    exported = load_file(tmp_path / "student.classifier.safetensors")
    assert close(features @ exported["weight"].T + exported["bias"], logits)
    reloaded = load_model(str(tmp_path / "student.safetensors"))
    assert reloaded.classifier.classes == list(CLASSES) and torch.equal(reloaded.classifier.weight,
                                                                        model.classifier.weight)


def test_each_generation_is_the_run_the_command_line_hands_over_at_that_moment(monkeypatch, tmp_path):
    """The generations call cli.training's run as it is when they run, not as it was when cli.generations was first
    imported: a copy bound at import kept a test's stand-in for good, and every later `--generations N` of that
    process trained nothing and returned 0 (seen under pytest-xdist)."""
    from unsupdistill.cli import generations, training
    from unsupdistill.config import Config

    calls = []

    def stopped(config, run_dir, *args):
        calls.append(run_dir.name)
        return training.EXIT_STOPPED, config, None

    monkeypatch.setattr(training, "train_run", stopped)
    chain = {"generations": 2, "config": Config(method="distill").to_dict(), "automatic": False, "overrides": [],
             "pair": None}
    assert generations.train_generations(tmp_path / "root", chain, torch.device("cpu")) == training.EXIT_STOPPED
    assert calls == ["gen_1"]  # the run in place now; stopped, so no second generation
