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
import queue
import time

import common
import torch

from unsupdistill.data.labeled import align_labels, load_labeled
from unsupdistill.evaluate.linear import linear_probe
from unsupdistill.evaluate.linear_grid import linear_probe_grid
from unsupdistill.evaluate.run import EvalOptions, model_features
from unsupdistill.models.load import load_model


def _sklearn_worker(jobs: mp.Queue, results: mp.Queue) -> None:
    for data in iter(jobs.get, None):
        tic = time.perf_counter()
        result = linear_probe(*data)
        results.put({"top1": result["top1"], "seconds": time.perf_counter() - tic, "best": {"C": result["best_C"]}})


class SklearnProbe:
    """scikit-learn's probe in a child process, one for every model (a child imports the package again: seconds);
    a probe still running after ``timeout`` seconds is stopped with its child (``finished`` False), and the next
    model gets a new child.

    The child is spawned, not forked: a fork of a process whose OpenMP threads have run hangs in the child.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout, self.child = timeout, None

    def __call__(self, data: tuple) -> dict:
        context = mp.get_context("spawn")
        if self.child is None:
            self.jobs, self.results = context.Queue(), context.Queue()
            self.child = context.Process(target=_sklearn_worker, args=(self.jobs, self.results))
            self.child.start()
        tic = time.perf_counter()
        self.jobs.put(data)
        while True:
            try:
                return {**self.results.get(timeout=1.0), "finished": True}
            except queue.Empty:
                if not self.child.is_alive():
                    raise RuntimeError(f"the scikit-learn probe's process died (exit {self.child.exitcode})") from None
                if time.perf_counter() - tic > self.timeout:
                    self.close()
                    return {"top1": None, "seconds": time.perf_counter() - tic, "finished": False}

    def close(self) -> None:
        if self.child is not None:
            self.child.terminate()
            self.child.join()
            self.child = None


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
    rows, sklearn_probe = [], SklearnProbe(args.sklearn_timeout)
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
                  else sklearn_probe(data))
        torch.set_num_threads(threads)
        row = {"model": model.name, "train": len(train_x), "dim": train_x.shape[1],
               "torch_top1": ours["top1"], "torch_s": ours["seconds"], "torch_best": ours["best"],
               "sklearn_top1": theirs["top1"], "sklearn_s": theirs["seconds"], "sklearn_finished": theirs["finished"],
               "sklearn_best": theirs.get("best"),
               "speedup": theirs["seconds"] / ours["seconds"] if theirs["seconds"] else None}
        print(json.dumps(row), flush=True)
        rows.append(row)
    sklearn_probe.close()
    columns = ["model", "train", "dim", "torch_top1", "torch_s", "sklearn_top1", "sklearn_s", "sklearn_finished",
               "speedup"]
    common.print_table(rows, columns)
    common.write_result(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
