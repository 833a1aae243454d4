"""Evaluate a list of models on a list of labeled datasets and write the markdown table for BENCHMARKS.md
(``unsupdistill eval MODEL... --suite FILE`` with the datasets given on the command line).

Each dataset is NAME:TRAIN:TEST:SIZE (SIZE is the input size given to models that do not record one:
``pixels`` and ``timm:`` random-init baselines). Example, from the repository root:

    python eval/benchmark.py --dataset digits:digits:digits:16 \\
        --model pixels --model "timm:resnet18,small_image_stem=true,channels=[32,64,128,256],stem_width=32" \\
        --model runs/digits --out bench_digits.md
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import common

from unsupdistill.evaluate.report import format_table
from unsupdistill.evaluate.run import EvalOptions
from unsupdistill.evaluate.suite import LabeledPair, run_suite


def parse_dataset(spec: str) -> LabeledPair:
    parts = spec.rsplit(":", 3)
    if len(parts) != 4 or not parts[3].isdigit():
        raise SystemExit(f"--dataset {spec!r}: expected NAME:TRAIN:TEST:SIZE, e.g. digits:digits:digits:16")
    name, train, test, size = parts
    return LabeledPair(name, train, test, int(size))


def main(argv: list[str] | None = None) -> int:
    parser = common.script_parser(__doc__, json="all results as JSON",
                                  out="markdown file to write (the table is printed too)")
    parser.add_argument("--model", action="append", required=True, help="model spec (repeat)")
    parser.add_argument("--dataset", action="append", required=True, help="NAME:TRAIN:TEST:SIZE (repeat)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--linear", default="torch", choices=["torch", "sklearn"])
    parser.add_argument("--no-linear", action="store_true")
    parser.add_argument("--no-clustering", action="store_true")
    args = parser.parse_args(argv)

    options = EvalOptions(precision=args.precision, linear=not args.no_linear, linear_backend=args.linear,
                          clustering=not args.no_clustering, plots=False)
    with tempfile.TemporaryDirectory() as reports:  # unsupdistill eval --suite, with its table moved to --out
        rows, _ = run_suite(args.model, [parse_dataset(s) for s in args.dataset], options, Path(reports))
        table = (Path(reports) / "suite.md").read_text()
        if args.json:
            args.json.write_bytes((Path(reports) / "suite.json").read_bytes())
    text = f"{table}\nCommand: `{common.command_line(argv)}`\n"
    print(format_table(rows, list(rows[0])) + "\n\n" + text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
