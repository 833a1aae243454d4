"""Sound on the Free Spoken Digit Dataset, as a newcomer runs it: a folder of recordings, no recipe, a time budget.

Rows (each scored on the test split with ``unsupdistill eval``: k-NN with k = 20 and the linear probe, the training
split as memory and probe set), for two label sets of the same recordings: the digit (the class folders) and the
speaker (the second field of ``<digit>_<speaker>_<index>.wav``, written as CSVs under OUT/labels):

- ``pretrain``: ``unsupdistill pretrain TRAIN train.time_budget_s=BUDGET`` (DINO from scratch, automatic settings);
- ``wide``: the same with a full-width ResNet-18 (``model.backbone_kwargs={}``), the teacher of ``distill-wide``;
- ``distill-wide``: ``unsupdistill distill TRAIN --teacher OUT/wide train.time_budget_s=BUDGET``;
- ``distill-image``: the same from an image network on spectrograms (``--image-teacher SPEC``, e.g. the ImageNet
  EfficientNet-Lite0);
- baselines: log-mel statistics (each mel band's mean and spread over time, through ``pretrain``'s front end) and
  ``pretrain``'s network at random init.

``--rows`` picks which trained rows to run (a run whose export exists is not trained again). The commands behind
BENCHMARKS.md::

    tar -xzf ../shared/data/fsdd-audio.tar.gz -C /tmp
    python eval/bench_audio.py --data /tmp/fsdd-audio --out /work/bench/audio --budget 600 \\
        --image-teacher "timm:tf_efficientnet_lite0,pretrained=true,pretrained_cfg_overlay={file: PATH}"
    python eval/bench_audio.py --quick --out /tmp/audio-smoke
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import common
import numpy as np
import soundfile as sf

from unsupdistill.data import list_audio_files
from unsupdistill.evaluate.summary import random_init_spec
from unsupdistill.run_dir import BACKBONE_SIDECAR

logger = logging.getLogger("bench_audio")

ROWS = ("pretrain", "wide", "distill-wide", "distill-image")
QUICK_RATE = 8000


def speaker_labels(split: Path, out: Path) -> Path:
    """A ``path,label`` CSV of ``split``'s recordings labeled by speaker (``<digit>_<speaker>_<index>.wav``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for path in list_audio_files(split):
            writer.writerow([str(path), path.stem.split("_")[1]])
    return out


def make_quick_sounds(root: Path) -> Path:
    """An FSDD-shaped folder under ``root``: 3 "digits" (tones of 3 pitches) by 2 "speakers" (their loudness and
    noise), 8 kHz WAV, 8 recordings of each pair in train/, 3 in test/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 3)):
        for digit, pitch in enumerate((300.0, 900.0, 2500.0)):
            folder = root / "sounds" / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for speaker, (level, noise) in enumerate(((0.5, 0.01), (0.2, 0.05))):
                for i in range(count):
                    t = np.arange(int(QUICK_RATE * rng.uniform(0.2, 0.4))) / QUICK_RATE
                    wave = level * np.sin(2 * np.pi * pitch * (1 + 0.03 * rng.standard_normal()) * t)
                    wave = (wave + noise * rng.standard_normal(t.size)).astype(np.float32)
                    sf.write(folder / f"{digit}_s{speaker}_{i}.wav", wave, QUICK_RATE)
    return root / "sounds"


def main(argv: list[str] | None = None) -> int:
    parser = common.runs_parser(__doc__, "result.json", budget=600, teachers=False)
    parser.add_argument("--image-teacher", metavar="SPEC", help="an image network for the distill-image row")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"trained rows to run, of {', '.join(ROWS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every trained run (e.g. audio.global_view.mix_p=0)")
    args = parser.parse_args(argv)
    common.log_to_console()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [*common.QUICK_RUN, *common.TINY_MODEL] if args.quick else []
    if args.quick:
        args.data = make_quick_sounds(args.out / "quick")
        args.budget = 4
        args.image_teacher = args.image_teacher or common.TINY_NETWORK
    if args.data is None:
        parser.error("give --data (a folder with train/ and test/ of <digit>/<digit>_<speaker>_<n>.wav) or --quick")
    rows = [row for row in args.rows.split(",") if row]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown or ("distill-image" in rows and not args.image_teacher):
        parser.error(f"--rows takes {', '.join(ROWS)} (distill-image needs --image-teacher), got {args.rows}")
    train, test = args.data / "train", args.data / "test"
    labels = {"digit": (train, test),
              "speaker": (speaker_labels(train, args.out / "labels" / "speaker-train.csv"),
                          speaker_labels(test, args.out / "labels" / "speaker-test.csv"))}
    budget = [f"train.time_budget_s={args.budget}", "eval.summary=false", *extra, *args.set]
    commands = {
        "pretrain": ["pretrain", str(train), *budget],
        "wide": ["pretrain", str(train), "model.backbone_kwargs={}", *budget],
        "distill-wide": ["distill", str(train), "--teacher", str(args.out / "wide"), *budget],
        "distill-image": ["distill", str(train), "--teacher", str(args.image_teacher), *budget],
    }
    if "distill-wide" in rows and "wide" not in rows and not (args.out / "wide" / "backbone.safetensors").is_file():
        rows.insert(rows.index("distill-wide"), "wide")  # its teacher first

    results = []
    for name in rows:
        run = args.out / name
        common.train_unless_done(run, [*commands[name], "--out", str(run)], f"{name}: {args.budget:.0f} s")
        results.append({"run": name, **common.training_summary(run), **scores(run, labels, args.out / "eval" / name,
                                                                              args)})
    reference = args.out / rows[0]  # the front end and network of the baselines
    frontend = ["--frontend-of", str(reference)]
    random_init = random_init_spec(json.loads((reference / BACKBONE_SIDECAR).read_text()), seed=0)
    baselines = {"log-mel statistics": ("logmel", "logmel"),
                 f"{rows[0]}'s network at random init": (random_init, "random-init")}
    for name, (spec, folder) in baselines.items():
        results.append({"run": name, **scores(spec, labels, args.out / "eval" / folder, args, frontend)})
    common.print_table([table_row(r) for r in results])
    common.write_result(args.json or args.out / "result.json", results, budget_s=args.budget)
    return 0


def scores(model: Path | str, labels: dict[str, tuple[Path, Path]], out: Path, args,
           extra: list[str] | None = None) -> dict:
    """k-NN and linear top-1 of ``model`` for each label set (``digit_knn``, ``speaker_linear``, ...)."""
    found = {}
    for label, (train, test) in labels.items():
        result = common.score_run(model, train, test, out / label, True, None, common.speed_seconds(args),
                                  extra or [])
        found |= {f"{label}_knn": result["knn_top1"], f"{label}_linear": result["linear_top1"],
                  "input_size": result["input_size"]}
    return found


def table_row(r: dict) -> dict:
    return {"run": r["run"], "digit k-NN": common.cell(r, "digit_knn", ".1f"),
            "digit linear": common.cell(r, "digit_linear", ".1f"), "speaker k-NN": common.cell(r, "speaker_knn", ".1f"),
            "speaker linear": common.cell(r, "speaker_linear", ".1f"), "epochs": common.cell(r, "epochs", ".1f"),
            "train clips/s": common.cell(r, "images_per_s", ".0f")}


if __name__ == "__main__":
    sys.exit(main())
