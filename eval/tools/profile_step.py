"""Where a training step's time goes: ``torch.profiler`` over real ``Trainer.train_step`` calls.

The trainer is the one ``unsupdistill pretrain`` builds for a recipe and overrides (default: the built-in
digits run), fed by its own loader. After warm-up steps, the profiled steps print the operators with the most
self CPU time and the step's stages (``bench_train.py``'s breakdown: data, augmentation, forwards, backward,
optimizer, EMA). ``--trace`` also writes a Chrome trace to open in ``chrome://tracing`` or Perfetto::

    python eval/tools/profile_step.py                                   # the digits default
    python eval/tools/profile_step.py --recipe cifar10_cpu data.path=/tmp/cifar10/train --steps 5
    python eval/tools/profile_step.py --quick
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py and the benchmarks

import bench_train
import common
import torch
from torch.profiler import ProfilerActivity, profile

from unsupdistill.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = common.script_parser(__doc__, quick="a tiny network and 2 steps (a smoke test)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--recipe", default="digits",
                        help="shipped recipe or YAML file (default: digits, the built-in run's)")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    parser.add_argument("--trace", type=Path, help="write a Chrome trace here")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.quick:
        overrides = [*common.TINY_MODEL, *overrides]
        args.warmup_steps, args.steps = 1, 2
    config = load_config(args.recipe, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = bench_train.UnsupdistillPipeline(config, Path(tmp) / "run")
        t = pipeline.trainer
        for _ in range(args.warmup_steps):
            pipeline.step()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if t.device.type == "cuda"
                                                           else [])) as prof:
            for _ in range(args.steps):
                pipeline.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if args.trace:
            prof.export_chrome_trace(str(args.trace))
            print(f"trace written to {args.trace}")
        timer = bench_train.StageTimer(t.device)
        for _ in range(args.steps):
            bench_train.timed_step(pipeline, timer)
        stages = {name: statistics.median(values) * 1000 for name, values in timer.seconds.items()}
        total = sum(stages.values())
        print(f"\nstages of a step (median ms of {args.steps}; batch {t.local_batch}, "
              f"{torch.get_num_threads()} threads):")
        for name, ms in stages.items():
            print(f"  {name:<55} {ms:8.1f}  {100 * ms / total:5.1f} %")
        print(f"  {'step':<55} {total:8.1f}  -> {t.local_batch / total * 1000:.0f} images/s, "
              f"{1000 / total:.2f} steps/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
