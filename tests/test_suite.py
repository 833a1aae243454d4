"""Benchmark suites: `unsupdistill eval MODEL... --suite FILE` evaluates every model on every labeled set."""

import json
import logging

import pytest

from unsupdistill.cli import main
from unsupdistill.config import ConfigError
from unsupdistill.evaluate.run import EvalOptions, evaluate
from unsupdistill.evaluate.suite import load_suite

FAST = ["--no-clustering", "--no-plots", "--no-linear"]


def test_suite_table_has_a_row_per_dataset_and_model_with_evals_numbers(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text("datasets:\n"
                     "  - {name: digits-8, train: digits, test: digits, image_size: 8}\n"
                     "  - {name: digits-4, train: digits, test: digits, image_size: 4}\n")
    out = tmp_path / "out"
    assert main(["eval", "pixels", "timm:resnet18,small_image_stem=true,channels=[8,8,16,16],stem_width=8",
                 "--suite", str(suite), "--out", str(out), "--no-cache", *FAST]) == 0
    printed = capsys.readouterr().out
    assert str(out / "suite.md") in printed
    table = (out / "suite.md").read_text()
    assert table.count("| digits-8 ") == 2 and table.count("| digits-4 ") == 2
    results = json.loads((out / "suite.json").read_text())["results"]
    assert [(r["dataset"], r["model_spec"][:5]) for r in results] == [
        ("digits-8", "pixel"), ("digits-8", "timm:"), ("digits-4", "pixel"), ("digits-4", "timm:")]
    # the same numbers as a single evaluation of the same model and set
    alone = evaluate("pixels", "digits", "digits", EvalOptions(image_size=4, linear=False, clustering=False,
                                                                plots=False, cache=False))
    assert results[2]["knn"]["20"]["top1"] == alone["knn"][20]["top1"]
    assert results[0]["knn"]["20"]["top1"] != results[2]["knn"]["20"]["top1"]  # 8 px and 4 px differ
    assert (out / "digits-4" / "0-pixels" / "eval.json").is_file()


def test_several_models_without_a_suite_share_one_table(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "pixels", "pixels", "--train", "digits", "--test", "digits", "--image-size", "8",
                 "--out", str(out), "--no-cache", *FAST]) == 0
    rows = json.loads((out / "suite.json").read_text())["results"]
    assert len(rows) == 2 and rows[0]["knn"] == rows[1]["knn"]


@pytest.mark.parametrize("text, expected", [
    ("datasets: []", "'datasets:' list"),
    ("datasets:\n  - {name: a, train: digits}", "'test' is missing"),
    ("datasets:\n  - {name: a, train: digits, test: digits, size: 8}", "unknown key(s) size"),
    ("datasets:\n  - {name: a, train: digits, test: digits, image_size: 0}", "image_size=0"),
    ("datasets:\n  - {name: a, train: digits, test: digits}\n  - {name: a, train: digits, test: digits}",
     "used twice"),
    ("datasets: [", "not valid YAML"),
])
def test_bad_suite_files_name_the_entry_and_key(tmp_path, text, expected):
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_suite(suite)


def test_relative_paths_are_read_from_the_suite_folder(tmp_path):
    suite = tmp_path / "suites" / "mine.yaml"
    suite.parent.mkdir()
    suite.write_text("datasets:\n  - {name: a, train: data/train, test: /abs/test}\n")
    (pair,) = load_suite(suite)
    assert pair.train == str(tmp_path / "suites" / "data" / "train") and pair.test == "/abs/test"


def test_eval_needs_a_pair_or_a_suite(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "pixels", "--train", "digits"])
    assert "--suite" in capsys.readouterr().err


def test_a_bad_suite_is_a_clear_cli_error(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["eval", "pixels", "--suite", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in caplog.text
