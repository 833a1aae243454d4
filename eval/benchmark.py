"""Evaluate a list of models on a list of labeled datasets and write the markdown table for BENCHMARKS.md.

Each dataset is NAME:TRAIN:TEST:SIZE (SIZE is the input size given to models that do not record one:
``pixels`` and ``timm:`` random-init baselines). Example, from the repository root:

    python eval/benchmark.py --dataset digits:digits:digits:16 \\
        --model pixels --model "timm:resnet18,small_image_stem=true,channels=[32,64,128,256],stem_width=32" \\
        --model runs/digits --out bench_digits.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from unsupdistill.evaluate.report import format_table
from unsupdistill.evaluate.run import EvalOptions, evaluate, summary_row


def parse_dataset(spec: str) -> tuple[str, str, str, int]:
    parts = spec.rsplit(":", 3)
    if len(parts) != 4 or not parts[3].isdigit():
        raise SystemExit(f"--dataset {spec!r}: expected NAME:TRAIN:TEST:SIZE, e.g. digits:digits:digits:16")
    name, train, test, size = parts
    return name, train, test, int(size)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="model spec (repeat)")
    parser.add_argument("--dataset", action="append", required=True, help="NAME:TRAIN:TEST:SIZE (repeat)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--no-linear", action="store_true")
    parser.add_argument("--no-clustering", action="store_true")
    parser.add_argument("--out", type=Path, help="markdown file to write (the table is printed too)")
    parser.add_argument("--json", type=Path, help="all results as JSON")
    args = parser.parse_args(argv)

    rows, everything = [], []
    for spec in args.dataset:
        name, train, test, size = parse_dataset(spec)
        for model in args.model:
            options = EvalOptions(image_size=size, precision=args.precision, linear=not args.no_linear,
                                  clustering=not args.no_clustering, plots=False)
            results = evaluate(model, train, test, options)
            everything.append(results)
            seconds = sum(results["seconds"].values())
            rows.append({"dataset": name, **summary_row(results), "dim": str(results["feature_dim"]),
                         "eval time (s)": f"{seconds:.0f}"})
            print(format_table(rows[-1:], list(rows[-1])), flush=True)

    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = format_table([{c: row.get(c, "") for c in columns} for row in rows], columns, markdown=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    text = (f"{table}\n\nCommand: `{command}`  \nMachine: {machine()}  \n"
            f"Date: {datetime.date.today().isoformat()}  \n"
            f"k-NN: k = 20, T = 0.07, top-1 on the test split; linear probe: logistic regression, C chosen on "
            f"20 % of the training split; clustering: faiss k-means (k = classes) on the test split, 5 seeds.\n")
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
