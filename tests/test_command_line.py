"""One command line (docs/command-line.md): every verb's --help follows one rule for --out, the labeled sets,
precision, device, workers and batch size; the old spellings still work, with a warning; user errors exit 2."""

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_teacher
from PIL import Image

from unsupdistill.cli import build_parser, main
from unsupdistill.cli import options as cli_options
from unsupdistill.cli.options import apply_old_spellings, training_overrides
from unsupdistill.config import load_config
from unsupdistill.data import DigitsDataset
from unsupdistill.evaluate import run as evaluate_run
from unsupdistill.evaluate.run import AUTO_BF16_MIN_IMAGES
from unsupdistill.train import precision

VERBS = ("pretrain", "distill", "eval", "export", "embed", "show")
BATCHED = {"pretrain": ("auto", "fp32", "bf16", "fp16"), "distill": ("auto", "fp32", "bf16", "fp16"),
           "eval": ("auto", "fp32", "bf16"), "embed": ("auto", "fp32", "bf16")}
"""The verbs that run a network in batches, and the precisions each offers."""
TRAINING = ("pretrain", "distill")
OLD_LABELED = {"pretrain": ("--probe-train", "--probe-test"), "distill": ("--probe-train", "--probe-test"),
               "eval": ("--train", "--test")}
FAST_EVAL = ["--image-size", "8", "--no-linear", "--no-clustering", "--no-plots", "--no-cache"]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("verb", VERBS)
def test_every_verbs_help_follows_the_one_rule(verb):
    parser = subparsers()[verb]
    found, text = options(parser), parser.format_help()
    out = found["--out"]  # a folder, optional, with a default the help names
    assert out.metavar == "DIR" and not out.required and out.default is None and out.type is Path
    assert "folder" in out.help and "(default " in out.help and "--out DIR" in text

    labeled = verb in OLD_LABELED
    assert ("--eval-train" in found and "--eval-test" in found) == labeled
    if labeled:
        for new, old in zip(("--eval-train", "--eval-test"), OLD_LABELED[verb]):
            assert found[new].metavar == "LABELED" and f"was {old}" in found[new].help
            assert found[old].help == argparse.SUPPRESS and found[old].dest == f"old_{found[new].dest}"
            assert f"{new} LABELED" in text and f"{old} " not in text.replace(f"was {old}", "")

    batched = verb in BATCHED
    for flag in ("--precision", "--device", "--workers"):
        assert (flag in found) == batched, flag
    assert ("--batch-size" in found) == (verb != "export")  # show embeds its retrieval gallery in batches
    if batched:
        assert tuple(found["--precision"].choices) == BATCHED[verb]
        # a training verb's flags default to nothing: the recipe's or the automatic train.precision and train.device
        # apply unless the flag is given; eval and embed choose auto themselves
        default = None if verb in TRAINING else "auto"
        assert found["--precision"].default == default and found["--device"].default == default
        assert "(default auto" in found["--device"].help and "{auto,cpu,cuda" in text
        assert found["--workers"].metavar == found["--batch-size"].metavar == "N"
        assert "--precision {" + ",".join(BATCHED[verb]) + "}" in text


def test_each_precision_help_says_what_its_auto_does(monkeypatch):
    """Training's auto is bf16 on a CPU with native bf16 and fp32 on one without; eval's and embed's is bf16 only on
    such a CPU from 10,000 images on, fp32 on CUDA. The training help said bf16 on any CPU: each says its own now."""
    cpu, rule = torch.device("cpu"), {}
    for native in (False, True):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        monkeypatch.setattr(evaluate_run, "cpu_has_native_bf16", lambda native=native: native)
        rule[native] = (precision.resolve_precision("auto", cpu),
                        evaluate_run.extraction_precision("auto", cpu, AUTO_BF16_MIN_IMAGES - 1),
                        evaluate_run.extraction_precision("auto", cpu, AUTO_BF16_MIN_IMAGES))
    assert rule == {False: (None, "fp32", "fp32"), True: (torch.bfloat16, "fp32", "bf16")}
    assert evaluate_run.extraction_precision("auto", torch.device("cuda"), 10**6) == "fp32"
    for verb in ("pretrain", "distill"):
        text = options(subparsers()[verb])["--precision"].help
        assert "bf16 autocast on a CPU with native bf16" in text and "fp32 on a CPU without native bf16" in text
    for verb in ("eval", "embed"):
        text = options(subparsers()[verb])["--precision"].help
        assert "bf16 autocast only on a CPU with native bf16" in text and "10,000 images or more" in text
        assert "else fp32, on CUDA too" in text


REQUIRED = {"pretrain": [], "distill": [], "eval": ["pixels"], "embed": ["pixels", "images"],
            "show": ["pixels", "image.png"], "export": ["run", "--format", "onnx"]}
"""Each verb's required arguments, so that a parse gets as far as the flag tested."""


def test_every_integer_flag_refuses_values_it_cannot_take(capsys):
    """--top-k -3 and --max-images -1 were taken silently (no predictions, no pictures): every integer flag now
    names its allowed values in an argparse error (exit 2). --workers and --top-k take 0 (none); the others >= 1."""
    checked = 0
    for verb, parser in subparsers().items():
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.type is not int, f"{verb} {action.option_strings[0]}: an unchecked integer"
            if action.type not in (cli_options.count, cli_options.positive):
                continue
            flag, lowest = action.option_strings[0], 0 if action.type is cli_options.count else 1
            for bad in (str(lowest - 1), "-3", "two"):
                with pytest.raises(SystemExit) as refused:
                    parser.parse_args([*REQUIRED[verb], flag, bad])
                assert refused.value.code == 2
                assert f"argument {flag}: expected an integer >= {lowest}, got '{bad}'" in capsys.readouterr().err
            parser.parse_args([*REQUIRED[verb], flag, str(lowest)])
            checked += 1
    assert checked == 19  # workers and batch size on 4 verbs, show's batch size, and 10 more
    for argv in (["embed", "pixels", "images", "--top-k", "-3"], ["show", "pixels", "x.png", "--max-images", "-1"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert f"argument {argv[3]}: expected an integer >= " in capsys.readouterr().err


def test_show_spells_k_as_eval_does_and_still_reads_minus_k_with_a_warning(tmp_path, caplog, capsys):
    found = options(subparsers()["show"])
    assert found["--k"].metavar == "K" and "was -k" in found["--k"].help and found["-k"].help == argparse.SUPPRESS
    assert "--k K" in subparsers()["show"].format_help()
    model = export_teacher(tmp_path / "model", 16, seed=0)
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (16, 16), colour).save(images / f"{i}.png")
    show = ["show", str(model), str(images), "--gallery", str(images), "--kind", "retrieval"]
    with caplog.at_level(logging.WARNING):
        assert main([*show, "--out", str(tmp_path / "new"), "--k", "2"]) == 0
    assert "deprecated" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert main([*show, "--out", str(tmp_path / "old"), "-k", "2"]) == 0
    assert "-k is deprecated" in caplog.text and "use --k" in caplog.text
    new, old = (np.asarray(Image.open(tmp_path / name / "retrieval.png")) for name in ("new", "old"))
    assert np.array_equal(new, old)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([*show, "--out", str(tmp_path / "both"), "--k", "2", "-k", "3"]) == 2
    assert "--k 2 and -k 3 disagree" in caplog.text


def test_every_labeled_set_flag_says_how_a_labeled_csv_is_written():
    """A labeled CSV needs a path,label header and reads its relative paths from its own folder: each help says so."""
    said = "the header line path,label first, then one path,label row per image; a relative path is read from the CSV's"
    helps = [options(subparsers()[verb])["--eval-train"].help for verb in ("pretrain", "distill", "eval")]
    helps += [options(subparsers()["distill"])["--labels"].help, subparsers()["eval"].description]
    for text in helps:
        assert said in " ".join(text.split()), text


def test_training_flags_set_their_config_keys_and_refuse_a_disagreeing_override(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["pretrain", "--precision", "fp32", "--device", "cpu", "--workers", "0",
                              "--batch-size", "8", "--eval-train", "digits", "--eval-test", "digits"])
    apply_old_spellings(args)
    overrides = training_overrides(args, ["train.epochs=1", "train.batch_size=8"])  # the same value: fine
    config = load_config(None, overrides)
    assert (config.train.precision, config.train.device, config.data.num_workers, config.train.batch_size,
            config.eval.train, config.eval.test) == ("fp32", "cpu", 0, 8, "digits", "digits")
    # flags not given set nothing: the recipe's values (here as key=value) stay, with no disagreement
    recipe = ["train.precision=bf16", "train.device=cpu", "data.num_workers=3", "train.batch_size=32"]
    assert training_overrides(parser.parse_args(["pretrain"]), recipe) == recipe

    code = main(["pretrain", "--dry-run", "--out", str(tmp_path / "r"), "--batch-size", "8", "train.batch_size=16"])
    assert code == 2
    code = main(["pretrain", "--dry-run", "--out", str(tmp_path / "r"), "--precision", "bf16",
                 "train.precision=fp32"])
    assert code == 2


def test_a_flag_and_an_override_that_disagree_are_both_named(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["distill", "--dry-run", "--out", str(tmp_path / "r"), "--workers", "2",
                     "data.num_workers=0"]) == 2
    assert "--workers 2" in caplog.text and "data.num_workers=0" in caplog.text


def test_old_labeled_spellings_are_read_as_the_new_ones_with_a_warning(caplog):
    parser = build_parser()
    for verb, (old_train, old_test) in OLD_LABELED.items():
        extra = ["pixels"] if verb == "eval" else []
        args = parser.parse_args([verb, *extra, old_train, "digits", old_test, "digits"])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            apply_old_spellings(args)
        assert (args.eval_train, args.eval_test) == ("digits", "digits")
        assert f"{old_train} is deprecated" in caplog.text and "use --eval-train" in caplog.text
        assert f"{old_test} is deprecated" in caplog.text and "use --eval-test" in caplog.text

    args = parser.parse_args(["pretrain", "--probe-train", "digits"])
    apply_old_spellings(args)
    assert training_overrides(args, ["eval.test=digits"])[-1] == "eval.train=digits"


def test_an_old_and_a_new_spelling_with_different_values_are_refused(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["eval", "pixels", "--eval-train", "digits", "--train", str(tmp_path), "--eval-test",
                     "digits", *FAST_EVAL]) == 2
    assert "--eval-train digits" in caplog.text and f"--train {tmp_path}" in caplog.text


def test_old_probe_flags_still_run_a_training_verb_with_a_warning(tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING):
        assert main(["pretrain", "--dry-run", "--out", str(tmp_path / "r"), "--probe-train", "digits",
                     "--probe-test", "digits", "--batch-size", "8", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["dry_run"] == "ok"
    assert "--probe-train is deprecated" in caplog.text and "--probe-test is deprecated" in caplog.text
    assert not (tmp_path / "r").exists()


def test_eval_reads_old_and_new_spellings_alike_and_takes_k(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "pixels", "--train", "digits", "--test", "digits", "--out", str(tmp_path / "old"),
                     "--k", "3", "7", *FAST_EVAL]) == 0
    assert "--train is deprecated" in caplog.text and "--test is deprecated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "pixels", "--eval-train", "digits", "--eval-test", "digits", "--out",
                     str(tmp_path / "new"), "--k", "3", "7", *FAST_EVAL]) == 0
    assert "deprecated" not in caplog.text
    old, new = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("old", "new"))
    assert list(new["knn"]) == ["3", "7"] and old["knn"] == new["knn"]
    assert new["precision"] == "fp32" and new["train"] == "digits"


def digit_images(folder: Path, count: int, start: int = 0) -> Path:
    folder.mkdir(parents=True)
    digits = DigitsDataset(8, indices=range(start, start + count))
    for i in range(count):
        Image.fromarray(digits[i].permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


def test_embed_writes_a_folder_and_still_reads_a_file_name_with_a_warning(tmp_path, caplog, capsys):
    data = digit_images(tmp_path / "images", 6)
    run = ["embed", "pixels", str(data), "--image-size", "8", "--workers", "0"]
    with caplog.at_level(logging.WARNING):
        assert main([*run, "--out", str(tmp_path / "folder")]) == 0
    assert "deprecated" not in caplog.text
    folder = tmp_path / "folder"
    assert sorted(p.name for p in folder.iterdir()) == ["embed.json", "features.csv", "features.npy"]
    printed = capsys.readouterr().out
    assert all(str(folder / name) in printed for name in ("embed.json", "features.csv", "features.npy"))
    summary = json.loads((folder / "embed.json").read_text())
    assert summary["precision"] == "fp32" and summary["images"] == 6  # auto, under 10,000 images: fp32

    assert main([*run, "--out", str(tmp_path / "bundle"), "--format", "npz", "--precision", "bf16"]) == 0
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["embed.json", "features.npz"]
    assert json.loads((tmp_path / "bundle" / "embed.json").read_text())["precision"] == "bf16"

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([*run, "--out", str(tmp_path / "f.npy"), "--precision", "fp32"]) == 0
    assert "--out" in caplog.text and "is deprecated" in caplog.text and "--format npy" in caplog.text
    assert {"f.npy", "f.csv", "f.json"} <= {p.name for p in tmp_path.iterdir()}
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), np.load(folder / "features.npy"))
    assert json.loads((tmp_path / "f.json").read_text())["precision"] == "fp32"  # not torch.float32


def test_export_writes_into_a_folder_and_still_reads_a_file_name_with_a_warning(tmp_path, caplog, capsys):
    teacher = export_teacher(tmp_path / "teacher", 16, seed=0)
    run = ["export", str(teacher), "--format", "safetensors"]
    with caplog.at_level(logging.WARNING):
        assert main([*run, "--out", str(tmp_path / "exports")]) == 0
    assert "deprecated" not in caplog.text
    written = tmp_path / "exports" / "backbone-teacher.safetensors"  # named as in <run>/export/
    assert written.is_file() and written.with_suffix(".json").is_file() and str(written) in capsys.readouterr().out

    with caplog.at_level(logging.WARNING):
        assert main([*run, "--out", str(tmp_path / "mine.safetensors")]) == 0
    assert "(the export file) is deprecated" in caplog.text
    assert (tmp_path / "mine.safetensors").is_file() and (tmp_path / "mine.json").is_file()


def labeled_folder(root: Path, per_class: dict[str, int]) -> Path:
    """A folder of class subfolders holding ``per_class[name]`` 8x8 digits of that digit each."""
    digits = DigitsDataset(8, indices=range(300))
    by_class: dict[int, list[int]] = {}
    for i in range(300):
        by_class.setdefault(int(digits.labels[i]), []).append(i)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in by_class[int(name)][:count]:
            Image.fromarray(digits[i].permute(1, 2, 0).numpy()).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_eval_with_a_one_image_class_exits_2_naming_the_set_the_class_and_the_fix(tmp_path, caplog, backend):
    train = labeled_folder(tmp_path / "train", {"0": 6, "1": 6, "2": 1})
    test = labeled_folder(tmp_path / "test", {"0": 2, "1": 2, "2": 2})
    with caplog.at_level(logging.ERROR):
        code = main(["eval", "pixels", "--image-size", "8", "--eval-train", str(train), "--eval-test", str(test),
                     "--linear", backend, "--no-clustering", "--no-plots", "--no-cache", "--out", str(tmp_path / "e")])
    assert code == 2
    message = caplog.text
    assert str(train) in message and "class '2'" in message and str(train / "2") in message
    assert "add images" in message and "--no-linear" in message


def test_eval_with_too_few_images_for_the_held_out_split_exits_2(tmp_path, caplog):
    train = labeled_folder(tmp_path / "train", {"0": 2, "1": 2, "2": 2})  # 2 held out cannot hold 3 classes
    with caplog.at_level(logging.ERROR):
        assert main(["eval", "pixels", "--eval-train", str(train), "--eval-test", str(train), "--out",
                     str(tmp_path / "e"), "--image-size", "8", "--no-clustering", "--no-plots", "--no-cache"]) == 2
    assert f"train set {train} has 6 images in 3 classes" in caplog.text and "--no-linear" in caplog.text
