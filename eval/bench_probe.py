"""Linear probes on frozen features: the torch grid (``unsupdistill eval``'s default) against scikit-learn.

For each MODEL, the features of a labeled train/test pair are extracted once (``unsupdistill eval``'s code and
feature cache), then both probes run on the same tensors, each timed end to end (standardisation, choice of
the setting on a held-out 20 % of the train split, refit on the whole train split, test scoring):

- torch: :func:`~unsupdistill.evaluate.linear_grid.linear_probe_grid` (7 learning rates x 3 weight decays,
  SGD, 20 epochs, one pass over the data trains all 21 classifiers);
- scikit-learn: :func:`~unsupdistill.evaluate.linear.linear_probe` (``--linear sklearn``: lbfgs logistic
  regression, 6 values of C, warm-started), run in a child process that is stopped after
  ``--sklearn-timeout`` seconds; a probe stopped there is reported as not finished, with its time as a lower
  bound.

Commands behind BENCHMARKS.md ("Linear probe: torch grid against scikit-learn")::

    python eval/bench_probe.py --train /tmp/cifar10/train --test /tmp/cifar10/test \\
        --model /work/bench/cifar30 --model pixels --image-size 32 --json /tmp/bench/probe.json
    python eval/bench_probe.py --quick
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import common
import torch

from unsupdistill.data.labeled import align_labels, load_labeled
from unsupdistill.evaluate.linear import linear_probe
from unsupdistill.evaluate.linear_grid import linear_probe_grid
from unsupdistill.evaluate.run import EvalOptions, model_features
from unsupdistill.models.load import load_model


def _sklearn_child(queue: mp.Queue, data: tuple) -> None:
    tic = time.perf_counter()
    result = linear_probe(*data)
    queue.put({"top1": result["top1"], "seconds": time.perf_counter() - tic, "best": {"C": result["best_C"]}})


def sklearn_probe(data: tuple, timeout: float) -> dict:
    """scikit-learn's probe in a child process; ``finished`` False when it ran past ``timeout`` seconds.

    The child is spawned, not forked: a fork of a process whose OpenMP threads have run hangs in the child.
    """
    queue: mp.Queue = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=_sklearn_child, args=(queue, data))
    tic = time.perf_counter()
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.terminate()
        child.join()
        return {"top1": None, "seconds": time.perf_counter() - tic, "finished": False}
    return {**queue.get(timeout=10), "finished": True}


def torch_probe(data: tuple) -> dict:
    tic = time.perf_counter()
    result = linear_probe_grid(*data, device="cpu")
    return {"top1": result["top1"], "seconds": time.perf_counter() - tic, "best": result["best"], "finished": True}


def main(argv: list[str] | None = None) -> int:
    parser = common.labeled_pair_parser(__doc__, "digits, pixels and a tiny network (a smoke test)")
    parser.add_argument("--sklearn-timeout", type=float, default=3600.0, help="seconds before scikit-learn is stopped")
    parser.add_argument("--no-sklearn", action="store_true", help="the torch probe only")
    args = common.parse_labeled_pair(parser, argv, ["pixels", common.TINY_NETWORK])
    threads = torch.get_num_threads()
    rows = []
    for spec in args.model:
        model = load_model(spec, image_size=args.image_size)
        train_set = load_labeled(args.train, model.input_size, "train")
        test_set = load_labeled(args.test, model.input_size, "test")
        options = EvalOptions(image_size=args.image_size)
        train_x = model_features(model, train_set, options, torch.device("cpu"))
        test_x = model_features(model, test_set, options, torch.device("cpu"))
        data = (train_x, train_set.labels, test_x, align_labels(train_set, test_set))
        ours = torch_probe(data)
        theirs = ({"top1": None, "seconds": None, "finished": False} if args.no_sklearn
                  else sklearn_probe(data, args.sklearn_timeout))
        torch.set_num_threads(threads)
        row = {"model": model.name, "train": len(train_x), "dim": train_x.shape[1],
               "torch_top1": ours["top1"], "torch_s": ours["seconds"], "torch_best": ours["best"],
               "sklearn_top1": theirs["top1"], "sklearn_s": theirs["seconds"], "sklearn_finished": theirs["finished"],
               "sklearn_best": theirs.get("best"),
               "speedup": theirs["seconds"] / ours["seconds"] if theirs["seconds"] else None}
        print(json.dumps(row), flush=True)
        rows.append(row)
    columns = ["model", "train", "dim", "torch_top1", "torch_s", "sklearn_top1", "sklearn_s", "sklearn_finished",
               "speedup"]
    common.print_table(rows, columns)
    common.write_result(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
