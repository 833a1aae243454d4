"""The end of a run says what it learned: k-NN of the export, of the same network at random init and of raw
pixels, with the numbers `unsupdistill eval` gives for the same models and sets."""

import json
import logging
import shlex

import pytest
from conftest import export_teacher
from PIL import Image

from unsupdistill.cli import main
from unsupdistill.config import load_config
from unsupdistill.data import DigitsDataset, digits_split
from unsupdistill.evaluate.run import EvalOptions, evaluate
from unsupdistill.evaluate.summary import random_init_spec, run_summary
from unsupdistill.run_dir import read_metrics


def test_the_built_in_run_takes_the_digits_recipe(tmp_path, tiny):
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *tiny, "train.max_steps=1"]) == 0
    config = load_config(str(run / "config.yaml"))
    digits = load_config("digits")
    assert config.dino.local == digits.dino.local and config.dino.global_1 == digits.dino.global_1
    assert config.dino.centering == "sinkhorn" == digits.dino.centering
    assert (config.model.input_size, config.dino.global_1.flip_p, config.train.epochs) == (12, 0.0, 12)
    assert config.model.backbone_kwargs == {"channels": [8, 16, 32, 64], "stem_width": 8}  # key=value still wins
    folder_default = load_config(None, ["data.path=/images"])
    assert folder_default.dino.global_1.flip_p == 0.5 and folder_default.dino.centering == "ema"  # unchanged


def labeled_folder(root, indices):
    """Digits as PNG files in one subfolder per class."""
    digits = DigitsDataset(16, indices)
    for i in range(len(digits)):
        folder = root / str(int(digits.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits[i].permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return root


def knn(spec, train, test, size):
    options = EvalOptions(image_size=size, linear=False, clustering=False, plots=False, cache=False)
    return evaluate(spec, train, test, options)["knn"][20]["top1"]


def test_digits_run_ends_with_the_table_eval_gives(tmp_path, tiny, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *tiny, "eval.summary=true", "train.max_steps=3"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert "What the run learned" in printed and summary["reading"] in printed
    scores = summary["knn_top1"]
    assert list(scores) == ["this run", "same network, random init", "raw pixels"]
    sidecar = json.loads((run / "backbone.json").read_text())
    size = sidecar["input_size"]
    assert size == 12  # recipes/digits.yaml's global crops
    assert scores["this run"] == knn(str(run), "digits", "digits", size)
    assert scores["raw pixels"] == knn("pixels", "digits", "digits", size)
    assert summary["models"]["same network, random init"] == random_init_spec(sidecar, 0)  # train.seed's default
    assert scores["same network, random init"] == knn(random_init_spec(sidecar, 0), "digits", "digits", size)
    for value in scores.values():
        assert f"{value:.1f}" in summary["table"]

    # another train.seed draws another random init: its row changes, the trained and pixel rows do not
    reseeded = run_summary(run, "digits", "digits", seed=1)
    assert "seed=1" in reseeded["models"]["same network, random init"]
    assert reseeded["knn_top1"]["same network, random init"] != scores["same network, random init"]
    assert [reseeded["knn_top1"][name] for name in ("this run", "raw pixels")] == [scores["this run"],
                                                                                    scores["raw pixels"]]


def test_the_summary_commands_use_todays_flags_and_run_without_a_warning(tmp_path, caplog):
    """summary.json's eval commands gave the deprecated --train/--test: copied, they warned."""
    run = tmp_path / "run dir"  # a space: the command quotes it
    export_teacher(run, 8, seed=0)  # an exported backbone, as a finished run holds
    summary = run_summary(run, "digits", "digits", teacher=str(run), speed_seconds=0.05)
    for key in ("command", "teacher_command"):
        words = shlex.split(summary[key].replace("MODEL", shlex.quote(str(run))))
        assert words[:2] == ["unsupdistill", "eval"] and "--eval-train" in words and "--train" not in words, key
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main([*words[1:], "--out", str(tmp_path / key), "--no-plots", "--speed-seconds", "0.05"]) == 0
        assert "deprecated" not in caplog.text, key


def test_folder_run_is_scored_on_the_labeled_folders_given(tmp_path, tiny, capsys):
    train_idx, test_idx = digits_split()
    train, test = labeled_folder(tmp_path / "train", train_idx[:200]), labeled_folder(tmp_path / "test", test_idx[:100])
    run = tmp_path / "run"
    assert main(["pretrain", str(train), "--recipe", "digits", "--out", str(run), *tiny, "eval.summary=true",
                 "train.max_steps=2", "--probe-train", str(train), "--probe-test", str(test)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    size = json.loads((run / "backbone.json").read_text())["input_size"]
    assert summary["knn_top1"]["raw pixels"] == knn("pixels", str(train), str(test), size)
    assert "What the run learned" in capsys.readouterr().out
    # scored at the end only: a k-NN every epoch costs two feature extractions of the sets (eval.every_epochs)
    assert not any("knn_top1" in record for record in read_metrics(run)[0])


def test_folder_run_without_labels_prints_no_table(tmp_path, tiny, capsys):
    train_idx, _ = digits_split()
    images = labeled_folder(tmp_path / "images", train_idx[:100])
    run = tmp_path / "run"
    assert main(["pretrain", str(images), "--recipe", "digits", "--out", str(run), *tiny, "eval.summary=true",
                 "train.max_steps=2"]) == 0
    assert "What the run learned" not in capsys.readouterr().out
    assert not (run / "summary.json").exists()


def test_probe_flags_go_together_and_must_exist(tmp_path, tiny, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["pretrain", "--out", str(tmp_path / "a"), *tiny, "--probe-train", "digits"]) == 2
        assert main(["pretrain", "--out", str(tmp_path / "b"), *tiny, "--probe-train", "digits",
                     "--probe-test", str(tmp_path / "missing")]) == 2
    assert "--probe-test" in caplog.text and "missing" in caplog.text
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_the_reading_says_what_this_run_shows(tmp_path):
    """The reading names the run's length, images and whether its loss had flattened, and its advice follows
    them: a run still improving may close a gap by training longer; a flat one will not."""
    from unsupdistill.evaluate.summary import RunFacts, reading, run_facts

    # 40 logged losses falling 1 % per record, then one damaged line: the last tenth against the tenth before
    losses = [2.0 * 0.99**i for i in range(40)]
    lines = [json.dumps({"step": 10 * (i + 1), "epoch": (i + 1) / 8, "loss": loss}) for i, loss in enumerate(losses)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 41')
    facts = run_facts(tmp_path, {"step": 400, "trained_on": "/data/photos", "input_size": 96})
    expected = sum(losses[-4:]) / sum(losses[-8:-4]) - 1
    assert facts == RunFacts(400, 5.0, "/data/photos", 96, pytest.approx(expected))

    falling = reading(40.0, 20.0, 50.0, facts)
    assert "still 10.0 below raw pixels." in falling
    assert "trained 400 steps (5.0 epochs) on /data/photos at 96 px" in falling
    assert f"still falling ({expected:+.1%}" in falling and "A longer run (train.epochs" in falling
    flat = reading(40.0, 20.0, 50.0, RunFacts(9000, 90.0, "/data/photos", 96, -0.004))
    assert "had flattened (-0.4%" in flat and "ended its learning-rate schedule with its loss flat" in flat
    assert "A longer run" not in flat
    stuck = reading(21.0, 20.0, 50.0, RunFacts(9000, 90.0, "/data/photos", 96, 0.001))
    assert stuck.startswith("Not learned yet") and "health signals" in stuck and "Train longer" not in stuck
    short = reading(21.0, 20.0, 50.0, RunFacts(5, None, "digits", 8, None))
    assert "5 steps on digits" in short and "too few steps" in short and "Train longer" in short
    above = reading(60.0, 20.0, 50.0, RunFacts(9000, 90.0, "/data/photos", 96, -0.004))
    assert above.startswith("Learned: +40.0 points") and "10.0 above raw pixels" in above
    assert not any("small, centred" in text for text in (falling, flat, stuck, short, above))


def test_the_reading_takes_where_the_time_went_from_the_last_record_that_says(tmp_path):
    from unsupdistill.evaluate.summary import time_shares

    records = [{"step": 1, "loss": 1.0, "teacher_top_share": 0.3},
               {"step": 2, "loss": 0.9, "teacher_top_share": 0.2, "time_decode_share": 0.1, "time_views_share": 0.2,
                "time_teacher_share": 0.3, "time_student_share": 0.35, "time_rest_share": 0.05, "time_wall_s": 12.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert time_shares(tmp_path) == {"decode": 0.1, "views": 0.2, "teacher": 0.3, "student": 0.35, "rest": 0.05,
                                     "wall_s": 12.5}  # a health signal named *_share is not a time share
    (tmp_path / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    assert time_shares(tmp_path) == {}
