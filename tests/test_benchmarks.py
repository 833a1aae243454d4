"""The benchmark scripts of eval/ run end to end (--quick), and the figures they report hold together: each is
checked against the figures it is derived from (a ratio against its two rates, a median against its rounds, a
sum against its parts), against the run's own evaluation or a recomputation by the package on the same features,
and the printed markdown table against the JSON. No timing is asserted: the figures depend on the machine."""

import json
import re
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO, eval_script
from PIL import Image

from unsupdistill.config import Config, load_config, read_recipe
from unsupdistill.data.labeled import align_labels, load_labeled
from unsupdistill.evaluate.clustering import cluster
from unsupdistill.evaluate.knn import knn_evaluate
from unsupdistill.evaluate.run import EvalOptions, model_features
from unsupdistill.methods.dino.method import multi_crop
from unsupdistill.models.load import load_model
from unsupdistill.run_dir import read_metrics
from unsupdistill.train.precision import precision_name, resolve_precision

sys.path.insert(0, str(REPO / "eval"))
import bench_knn  # noqa: E402  (eval/ is a folder of scripts, not a package)
import bench_train  # noqa: E402
import common  # noqa: E402

STAGES = ["data loader wait (decode in workers)", "augmentation (the method's views)", "student forward",
          "teacher forward and loss (rest of the method's loss)", "optimizer step",
          "after the step (EMA update, queue)", "backward, gradient norm, clip (rest of the step)"]
QUICK_TEST_IMAGES = 36
"""The test split of the generated data of bench_distill, bench_kd and bench_trials --quick: 3 classes x 12."""
DIGITS_TEST_IMAGES = 540


def run_main(path: str, *args: str) -> str:
    """:func:`conftest.eval_script`, which must succeed; what the script printed."""
    code, printed = eval_script(path, *args)
    assert code in (0, None) or isinstance(code, dict), code
    return printed


def run_script(path: str, *args: str) -> tuple[dict, str]:
    """:func:`run_main`; the JSON the script wrote at --json, and what it printed."""
    printed = run_main(path, *args)
    return json.loads(Path(args[args.index("--json") + 1]).read_text()), printed


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """The markdown tables printed in ``text``, each a list of rows (column -> cell)."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif block:
            header, _, *rows = block
            tables.append([dict(zip(header, row)) for row in rows])
            block = []
    return tables


def assert_table_shows(table: list[dict[str, str]], rows: list[dict], columns: dict[str, tuple[str, str]]) -> None:
    """The table has a line per JSON row, whose ``column`` shows ``format(row[key], form)`` for each
    ``column: (key, form)`` (``-`` or nothing where the row has no value)."""
    assert len(table) == len(rows)
    for line, row in zip(table, rows):
        for column, (key, form) in columns.items():
            shown = ["-", ""] if row.get(key) is None else [format(row[key], form)]
            assert line[column] in shown, (column, line, row)


def assert_share_of(top1: float, images: int) -> None:
    """``top1`` (%) is a whole number of correct predictions out of ``images``."""
    correct = top1 * images / 100
    assert correct == pytest.approx(round(correct), abs=1e-6), (top1, images)


def package_knn_top1(model: str | Path, train: str | Path, test: str | Path, size: int | None = None) -> float:
    """k-NN top-1 (k = 20) of ``model`` recomputed by the package: its features of the two splits, then
    ``knn_evaluate``."""
    loaded = load_model(str(model), image_size=size)
    train_set, test_set = (load_labeled(str(spec), loaded.input_size, split)
                           for spec, split in ((train, "train"), (test, "test")))
    options, cpu = EvalOptions(precision="fp32", cache=False), torch.device("cpu")
    train_x, test_x = (model_features(loaded, dataset, options, cpu) for dataset in (train_set, test_set))
    return knn_evaluate(train_x, train_set.labels, test_x, align_labels(train_set, test_set), ks=(20,))[20]["top1"]


def run_reports(out: Path, rows: list[dict]) -> Iterator[tuple[dict, dict]]:
    """Each training run's row with its ``eval.json`` (rows named after their run folder under ``out``)."""
    for row in rows:
        if not row["run"].startswith("teacher:"):
            yield row, json.loads((out / row["run"] / "eval" / "eval.json").read_text())


def assert_scores_are_the_evaluations(row: dict, report: dict) -> None:
    """The row's scores are those of the run's ``unsupdistill eval``: k-NN at k = 20, the linear probe, the
    classifier, the speed; each accuracy a share of the test split."""
    assert report["precision"] == "fp32" and report["num_test"] == QUICK_TEST_IMAGES
    assert row["knn_top1"] == report["knn"]["20"]["top1"]
    assert row["linear_top1"] == report.get("linear", {}).get("top1")
    assert row["classifier_top1"] == report.get("classifier", {}).get("top1")
    assert (row["parameters"], row["gflops_per_image"]) == (report["speed"]["parameters"], report["speed"]["gflops"])
    for key in ("knn_top1", "linear_top1", "classifier_top1"):
        if row[key] is not None:
            assert_share_of(row[key], QUICK_TEST_IMAGES)


def assert_summary_is_the_metrics(row: dict, run: Path) -> None:
    """The row's training figures are those of the run's metrics.jsonl: its last step and epoch, the median of
    its logged images/s."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "images_per_s" in r]
    assert (row["steps"], row["epochs"]) == (records[-1]["step"], records[-1]["epoch"])
    assert row["images_per_s"] == statistics.median(r["images_per_s"] for r in records)


@pytest.mark.slow
def test_bench_train_quick_reports_every_variant_ratio_and_stage(tmp_path):
    results, stdout = run_script("bench_train.py", "--quick", "--breakdown", "--json", str(tmp_path / "train.json"))
    assert set(results["workloads"]) == {"cifar10", "multicrop"}
    tables = iter(markdown_tables(stdout))
    for workload in results["workloads"].values():
        auto = precision_name(resolve_precision("auto", torch.device("cpu")))  # bf16 where the CPU has it natively
        assert workload["precision"] == {"ours": auto, "ref-fp32": "fp32", "ref-bf16": "bf16"}
        assert workload["images"] == 64  # generated: max(64, 4 x batch 8)
        [rates] = workload["rounds"]
        assert workload["median_images_per_s"] == rates  # the median of one round is that round
        assert set(workload["ratios"]) == {"ours/ref-fp32", "ours/ref-bf16"}
        for pair, [ratio] in workload["ratios"].items():
            ours, ref = pair.split("/")
            assert ratio == pytest.approx(rates[ours] / rates[ref])
            assert workload["median_ratio"][pair] == ratio

        b = workload["breakdown"]
        assert list(b["stage_seconds"]) == STAGES
        assert b["step_seconds"] == pytest.approx(sum(b["stage_seconds"].values()))
        assert b["images_per_s"] == pytest.approx(8 / b["step_seconds"])  # --quick: batch 8
        assert b["achieved_gflop_per_s"] == pytest.approx(b["gflop_per_image"] * b["images_per_s"])
        assert set(b["peaks"]) == {"fp32", "bf16"}
        for peak in b["peaks"].values():
            assert peak["peak_gflop_per_s"] == max(peak["matmul_gflop_per_s"], peak["conv2d_gflop_per_s"])
        peak = {dtype: p["peak_gflop_per_s"] for dtype, p in b["peaks"].items()}
        assert b["utilisation"] == pytest.approx(b["achieved_gflop_per_s"] / peak[b["precision"]])
        assert set(workload["utilisation"]) == set(rates)
        for name, utilisation in workload["utilisation"].items():
            assert utilisation == pytest.approx(rates[name] * b["gflop_per_image"] / peak[workload["precision"][name]])

        rounds, stages = next(tables), next(tables)
        assert [line["round"] for line in rounds] == ["1", "median"]
        for line in rounds:
            assert [line[f"{name} img/s"] for name in rates] == [f"{rates[name]:.2f}" for name in rates]
        assert [line["stage"] for line in stages[:len(STAGES)]] == STAGES
        assert stages[len(STAGES)]["ms per step"] == f"{b['step_seconds'] * 1e3:.1f}"
        next(tables), next(tables)  # the measured peaks and the utilisation
    # FLOPs per source image: the teacher's forward on the 2 global crops and the student's forward and backward
    # (2 x its forward) on every crop; a 16-px local crop costs the ResNet a quarter of a 32-px global one, so the
    # 6 local crops of multicrop add 3 x 6 / 4 global forwards to the 2 + 3 x 2 of cifar10
    multicrop, cifar10 = (results["workloads"][w]["breakdown"]["gflop_per_image"] for w in ("multicrop", "cifar10"))
    assert multicrop / cifar10 == pytest.approx((8 + 3 * 6 / 4) / 8, rel=0.01)


def test_bench_knn_quick_runs(tmp_path):
    results, stdout = run_script("bench_knn.py", "--quick", "--repeats", "1", "--json", str(tmp_path / "bench.json"))
    assert "knn_evaluate:" in stdout and "scikit-learn:" in stdout and "| method" in stdout
    assert results["knn_evaluate"]["seconds"] > 0 and results["sklearn"]["seconds"] > 0
    assert results["config"]["train"] == 2000 and results["config"]["dim"] == 64 and results["config"]["test"] == 500
    assert results["accuracies_agree"], results


def test_bench_eval_quick_reports_knn_kmeans_and_extraction(tmp_path):
    results, stdout = run_script("bench_eval.py", "--quick", "--json", str(tmp_path / "eval.json"))
    assert set(results["classes"]) == {"10", "100"}
    table = markdown_tables(stdout)[0]
    for classes, r in results["classes"].items():
        train, train_labels, test, test_labels = bench_knn.clustered_features(2000, 500, 64, int(classes), 2.0)
        # the figures of the package on the same features
        knn = knn_evaluate(train, train_labels, test, test_labels, ks=(20,), temperature=0.07)[20]["top1"]
        assert r["knn"]["ours"]["top1"] == knn
        assert r["knn"]["sklearn"]["top1"] == pytest.approx(bench_knn.sklearn_knn_accuracy(train, train_labels,
                                                                                            test, test_labels))
        kmeans = cluster(test, test_labels, int(classes), seeds=(0,), niter=100)
        assert r["kmeans"]["ours"]["nmi"] == kmeans["nmi"] and r["kmeans"]["ours"]["iterations"] == 100
        for task in ("knn", "kmeans"):
            assert r[task]["sklearn_over_ours"] == pytest.approx(r[task]["sklearn"]["seconds"]
                                                                 / r[task]["ours"]["seconds"])
        lines = [line for line in table if line["classes"] == classes]
        assert [(line["task"], line["method"]) for line in lines] == [
            ("knn", "ours"), ("knn", "sklearn"), ("kmeans", "ours"), ("kmeans", "sklearn")]
        assert [line["seconds"] for line in lines] == [f"{r[task][name]['seconds']:.3f}" for task in ("knn", "kmeans")
                                                       for name in ("ours", "sklearn")]
        assert lines[0]["k-NN top-1 %"] == f"{knn:.3f}" and lines[2]["k-means NMI"] == f"{kmeans['nmi']:.3f}"
    extraction = results["extraction"]
    assert extraction["feature_dim"] == 64  # --quick: the 1/8-width ResNet-18
    for precision in ("fp32", "bf16"):
        e = extraction[precision]
        assert e["images"] == 64 and e["images_per_s"] == pytest.approx(e["images"] / e["seconds"])
    assert extraction["bf16_over_fp32"] == pytest.approx(extraction["bf16"]["images_per_s"]
                                                         / extraction["fp32"]["images_per_s"])


def test_bench_recipe_is_lightlys_cifar10_setting_and_holds_only_differences():
    cfg = load_config(str(bench_train.RECIPE))
    a, m = cfg.dino, cfg.model
    assert (m.input_size, a.local.size, a.num_local_crops) == (32, 16, 0)
    assert (a.global_1.blur_p, a.global_2.blur_p, a.local.blur_p) == (0, 0, 0)
    assert (m.backbone, m.backbone_kwargs, m.small_image_stem) == ("resnet18", {}, True)
    assert (a.head_hidden_dim, a.head_bottleneck_dim, a.head_output_dim) == (2048, 256, 2048)
    assert cfg.train.batch_size == 128
    data, _ = read_recipe(str(bench_train.RECIPE))

    def leaves(tree: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
        for key, value in tree.items():
            if isinstance(value, dict) and key != "backbone_kwargs":
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", list(value) if isinstance(value, tuple) else value

    defaults = dict(leaves(Config().to_dict()))
    for key, value in leaves(data):
        assert defaults[key] != value, f"{key} repeats the default"


@pytest.mark.parametrize("workload", ["cifar10", "multicrop"])
def test_both_pipelines_make_the_same_views(workload):
    cfg = load_config(str(bench_train.RECIPE), bench_train.WORKLOADS[workload])
    image = Image.new("RGB", (32, 32), (120, 30, 200))
    reference = bench_train.dino_transform(cfg)(image)
    global_views, local_views = multi_crop(cfg, 1.0)(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    ours = [tuple(global_views.shape[1:])] * 2
    if local_views is not None:
        ours += [tuple(local_views.shape[1:])] * (local_views.shape[0] // 4)
    assert [tuple(view.shape) for view in reference] == ours


@pytest.mark.slow
def test_bench_budget_quick_trains_the_reference_until_its_budget_ends_and_scores_it(tmp_path):
    out = tmp_path / "ref"
    run_main("bench_budget.py", "--quick", "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pipeline"] == "ref-fp32" and summary["minutes"] == 0.1 and summary["steps"] >= 2
    # the budget ended the run: the loop stops once one more step at the mean rate would overrun it, before the
    # recipe's epochs (64 generated images, batch 8: 8 steps an epoch)
    steps, seconds = summary["steps"], summary["train_seconds"]
    assert seconds * (steps + 1) / steps > 60 * summary["minutes"]
    assert summary["epochs"] == steps / 8 < load_config(str(bench_train.RECIPE)).train.epochs
    assert summary["images_per_s"] == pytest.approx(steps * 8 / seconds)
    # exported like an unsupdistill run, with the steps it trained, and scored as the package scores it
    assert json.loads((out / "backbone.json").read_text())["step"] == steps
    images = tmp_path / "images"  # the script's generated folder, made again
    for label in ("a", "b"):
        common.write_random_images(images / label, 32, 32, seed=ord(label))
    assert summary["eval"]["knn"]["20"]["top1"] == package_knn_top1(out, images, images)


@pytest.mark.slow
def test_bench_photos_quick_distills_and_scores_the_run_its_teacher_pixels_and_random_init(tmp_path):
    result, stdout = run_script("bench_photos.py", "--quick", "--out", str(tmp_path), "--json",
                                str(tmp_path / "r.json"))
    rows = result["rows"]
    assert [row["run"] for row in rows] == ["all", "teacher tiny", "raw pixels at 32 px",
                                            "the student's network at random init"]
    student = rows[0]
    assert_scores_are_the_evaluations(student, json.loads((tmp_path / "eval" / "all" / "eval.json").read_text()))
    assert_summary_is_the_metrics(student, tmp_path / "all")
    last = [r for r in read_metrics(tmp_path / "all")[0] if "time_wall_s" in r][-1]
    assert student["wall_s"] == last["time_wall_s"]
    assert sum(student[f"share_{part}"] for part in ("decode", "views", "teacher", "student", "rest")) == \
        pytest.approx(1.0, abs=0.01)
    assert (tmp_path / "all" / "teacher_maps" / "meta.json").is_file()  # the automatic settings: stored maps
    assert len(markdown_tables(stdout)[0]) == 4


@pytest.mark.slow
def test_bench_distill_quick_distills_trains_dino_and_scores_every_run(tmp_path):
    result, stdout = run_script("bench_distill.py", "--quick", "--out", str(tmp_path), "--json",
                                str(tmp_path / "r.json"))
    rows = result["rows"]
    assert [row["kind"] for row in rows] == [
        "teacher", "teacher", "distilled from tiny", "distilled from tiny, no cache", "DINO from scratch"]
    teacher, at16, student, uncached, scratch = rows
    data = tmp_path / "quick" / "data"
    for row, folder in ((teacher, "own"), (at16, "16")):
        assert_scores_are_the_evaluations(row, json.loads((tmp_path / "teacher-tiny" / folder / "eval.json")
                                                          .read_text()))
    assert teacher["knn_top1"] == package_knn_top1(tmp_path / "quick" / "teacher", data / "train", data / "test")
    assert (teacher["input_size"], at16["input_size"]) == (32, 16)  # its own size, then --teacher-sizes
    # a 16-px input costs the CIFAR-stem ResNet a quarter of the FLOPs of a 32-px one, with the same parameters
    assert at16["gflops_per_image"] == pytest.approx(teacher["gflops_per_image"] / 4, rel=0.05)
    assert at16["parameters"] == teacher["parameters"]
    for row, report in run_reports(tmp_path, rows):
        assert_scores_are_the_evaluations(row, report)
        assert_summary_is_the_metrics(row, tmp_path / row["run"])
    assert json.loads((tmp_path / "resnet18-tiny-from-tiny" / "backbone.json").read_text())["source"] == "student"
    config = (tmp_path / "resnet18-tiny-from-tiny-nocache" / "config.yaml").read_text()
    assert "cache: false" in config and "# Settings chosen automatically" in config  # no recipe: automatic
    # the same student network in all three runs; the teacher is 4x its width
    assert student["parameters"] == uncached["parameters"] == scratch["parameters"] < teacher["parameters"]
    assert_table_shows(markdown_tables(stdout)[0], rows, {
        "run": ("run", "s"), "input px": ("input_size", "d"), "k-NN top-1": ("knn_top1", ".2f"),
        "linear top-1": ("linear_top1", ".2f"), "train img/s": ("images_per_s", ".0f"), "epochs": ("epochs", ".2f"),
        "GFLOPs/image": ("gflops_per_image", ".3f")})


@pytest.mark.slow
def test_bench_kd_quick_runs_every_row_and_scores_the_classifiers(tmp_path):
    result, stdout = run_script("bench_kd.py", "--quick", "--out", str(tmp_path), "--json", str(tmp_path / "r.json"))
    rows = result["rows"]
    assert [row["kind"] for row in rows] == [
        "teacher, probe on the labels", "(a) cross-entropy on the labels only",
        "(b) distillation without labels, then the probe", "(c) distillation with labels",
        "(d) born-again generation 2"]
    teacher, labels_only, unlabeled, kd, gen2 = rows
    labels = tmp_path / "labels.csv"
    with open(labels) as f:
        assert len(f.readlines()) == 1 + 3 * 8  # 8 labeled images of each of the 3 classes
    # the teacher's k-NN memory and probe training set are the labeled images alone
    report = json.loads((tmp_path / "teacher-tiny" / "eval.json").read_text())
    assert report["num_train"] == 3 * 8
    assert_scores_are_the_evaluations(teacher, report)
    assert teacher["knn_top1"] == package_knn_top1(tmp_path / "quick" / "teacher", labels,
                                                   tmp_path / "quick" / "data" / "test")
    for row, report in run_reports(tmp_path, rows):
        assert report["num_train"] == 3 * 8
        assert_scores_are_the_evaluations(row, report)
        assert_summary_is_the_metrics(row, tmp_path / row["run"])
    # a classifier is exported by the runs with labels only
    assert [row["classifier_top1"] is not None for row in rows] == [False, True, False, True, True]
    chain = tmp_path / "c-kd-tiny"
    assert f"teacher: {chain / 'gen_1'}" in (chain / "gen_2" / "config.yaml").read_text()
    assert_table_shows(markdown_tables(stdout)[0], rows, {
        "run": ("run", "s"), "classifier top-1": ("classifier_top1", ".2f"), "linear top-1": ("linear_top1", ".2f"),
        "k-NN top-1": ("knn_top1", ".2f"), "train img/s": ("images_per_s", ".0f")})


@pytest.mark.slow
def test_bench_trials_quick_runs_and_scores_each_trial(tmp_path):
    result, stdout = run_script("bench_trials.py", "--quick", "--out", str(tmp_path), "--json",
                                str(tmp_path / "r.json"))
    rows = result["rows"]
    assert [row["trial"] for row in rows] == ["base", "sinkhorn"]
    assert rows[1]["overrides"] == "dino.centering=sinkhorn dino.koleo_weight=0.1"
    for row in rows:
        run = tmp_path / row["trial"]
        assert_scores_are_the_evaluations(row, json.loads((run / "eval" / "eval.json").read_text()))
        assert_summary_is_the_metrics(row, run)
    config = (tmp_path / "sinkhorn" / "config.yaml").read_text()
    assert "centering: sinkhorn" in config and "koleo_weight: 0.1" in config
    assert_table_shows(markdown_tables(stdout)[0], rows, {
        "trial": ("trial", "s"), "steps": ("steps", "d"), "epochs": ("epochs", ".2f"),
        "images/s": ("images_per_s", ".0f"), "k-NN top-1": ("knn_top1", ".2f")})


@pytest.mark.slow
def test_bench_probe_quick_runs_both_probes_on_the_same_features(tmp_path):
    result, stdout = run_script("bench_probe.py", "--quick", "--json", str(tmp_path / "probe.json"))
    rows = result["rows"]
    assert [row["model"] for row in rows] == ["pixels", "timm:resnet18"]
    assert [(row["train"], row["dim"]) for row in rows] == [(1257, 3 * 16 * 16), (1257, 16)]  # the digits split
    for row in rows:
        assert row["sklearn_finished"] and row["speedup"] == pytest.approx(row["sklearn_s"] / row["torch_s"])
        assert_share_of(row["torch_top1"], DIGITS_TEST_IMAGES)
        assert_share_of(row["sklearn_top1"], DIGITS_TEST_IMAGES)
    assert "--quick" in result["command"]
    assert_table_shows(markdown_tables(stdout)[0], rows, {
        "model": ("model", "s"), "torch_top1": ("torch_top1", ".2f"), "sklearn_top1": ("sklearn_top1", ".2f"),
        "speedup": ("speedup", ".2f")})


def test_bench_extract_and_profile_step_quick(tmp_path):
    result, stdout = run_script("bench_extract.py", "--quick", "--folder", str(tmp_path / "jpegs"),
                                "--json", str(tmp_path / "extract.json"))
    [row] = result["rows"]
    assert row["images"] == 200 and row["feature_dim"] == 16
    assert abs(row["images"] / row["images_per_s"] - row["seconds"]) <= 0.006  # both rounded from one timing
    assert (tmp_path / "jpegs-quick" / "class3").is_dir()  # 10 class folders of generated JPEGs
    assert_table_shows(markdown_tables(stdout)[0], result["rows"], {
        "images": ("images", "d"), "seconds": ("seconds", ".2f"), "images_per_s": ("images_per_s", ".2f")})

    profile = run_main("tools/profile_step.py", "--quick")
    assert "Self CPU" in profile  # the operator table, then the stages of the step
    stages = dict(re.findall(r"^  (.+?) +([\d.]+) +[\d.]+ %$", profile, re.M))
    assert list(stages) == STAGES
    batch = int(re.search(r"; batch (\d+),", profile)[1])
    total, images_per_s = re.search(r"^  step +([\d.]+)  -> (\d+) images/s", profile, re.M).groups()
    assert float(total) == pytest.approx(sum(map(float, stages.values())), abs=0.05 * (len(STAGES) + 1))
    assert int(images_per_s) == pytest.approx(batch / float(total) * 1000, abs=1 + batch / float(total) * 10)


def test_bench_precision_quick_compares_bf16_with_fp32(tmp_path):
    result, stdout = run_script("bench_precision.py", "--quick", "--json", str(tmp_path / "precision.json"))
    fp32, bf16 = result["rows"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16") and fp32["test"] == DIGITS_TEST_IMAGES
    for row in (fp32, bf16):
        assert_share_of(row["knn_top1"], DIGITS_TEST_IMAGES)
        assert_share_of(row["linear_top1"], DIGITS_TEST_IMAGES)
    assert 0 < bf16["feature_error_pct"] < 5  # bf16 keeps ~3 significant digits: close to fp32, not equal
    # a move of the top-1 is the net of the predictions that changed: never more than the flips
    for probe in ("knn", "linear"):
        moved = abs(bf16[f"{probe}_top1"] - fp32[f"{probe}_top1"]) * DIGITS_TEST_IMAGES / 100
        assert round(moved) <= bf16[f"{probe}_flips"]
    assert_table_shows(markdown_tables(stdout)[0], result["rows"], {
        "precision": ("precision", "s"), "knn_top1": ("knn_top1", ".2f"), "linear_top1": ("linear_top1", ".2f")})
