"""Feature extraction as ``unsupdistill eval`` runs it, in images per second, on a folder of JPEGs.

The folder (``--folder``, made once and reused) holds ``--images`` generated 64-px JPEGs in 10 class
subfolders: smooth random colour fields with a few discs, so the decoder does real work. Each setting times
:func:`unsupdistill.evaluate.run.model_features` (the code ``unsupdistill eval`` extracts with: decoding
workers, resize to the model's input, normalisation, the forward passes) with the feature cache off, for a
model (default: the half-width ResNet-18 with the CIFAR stem at 32 px, random init) and ``pixels``.

To compare two versions of the code in one run, run the script from each checkout (the script prints which
``unsupdistill`` it imported)::

    python eval/bench_extract.py --folder /tmp/bench/jpeg64-50k --images 50000 --json /tmp/bench/extract.json
    PYTHONPATH=/path/to/old/checkout python eval/bench_extract.py --folder /tmp/bench/jpeg64-50k --images 50000
    python eval/bench_extract.py --quick
"""

from __future__ import annotations

import os
import time
from dataclasses import fields
from pathlib import Path

import common
import numpy as np
import torch
from PIL import Image, ImageDraw

import unsupdistill
from unsupdistill.data.labeled import load_labeled
from unsupdistill.evaluate.run import EvalOptions, model_features
from unsupdistill.models.load import load_model

HALF_WIDTH = "timm:resnet18,small_image_stem=true,channels=[32,64,128,256],stem_width=32"


def make_folder(folder: Path, images: int, side: int = 64, seed: int = 0) -> Path:
    """``images`` JPEGs of ``side`` px in 10 class subfolders (kept when the folder already has them)."""
    done = folder / f".complete-{images}-{side}"
    if done.is_file():
        return folder
    rng = np.random.default_rng(seed)
    for i in range(images):
        low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)  # a smooth colour field, upsampled
        img = Image.fromarray(low).resize((side, side), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y, r = rng.integers(0, side, 2).tolist() + [int(rng.integers(4, side // 4))]
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.integers(0, 256, 3).tolist()))
        path = folder / f"class{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
    done.touch()
    return folder


def time_extraction(spec: str, folder: Path, image_size: int, options: EvalOptions) -> dict:
    """Seconds and images/s of one extraction of the folder."""
    model = load_model(spec, image_size=image_size)
    dataset = load_labeled(str(folder), model.input_size, "train")
    tic = time.perf_counter()
    features = model_features(model, dataset, options, torch.device("cpu"))
    seconds = time.perf_counter() - tic
    return {"model": model.name, "images": len(dataset), "feature_dim": features.shape[1],
            "seconds": round(seconds, 2), "images_per_s": round(len(dataset) / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = common.script_parser(__doc__, quick="200 images, a tiny network (a smoke test)",
                                  json="write the rows here")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/bench/jpeg64"))
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--model", action="append", help="MODEL arguments to time (default: half-width ResNet-18 "
                        "and pixels)")
    parser.add_argument("--workers", type=int, action="append", help="decoding workers (default: eval's own)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: eval's)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args(argv)
    if args.quick:
        args.images = 200
        args.folder = args.folder.with_name(args.folder.name + "-quick")
        args.model = args.model or [common.TINY_NETWORK]
    common.log_to_console()
    folder = make_folder(args.folder, args.images)
    print(f"unsupdistill from {Path(unsupdistill.__file__).parent}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    known = {f.name for f in fields(EvalOptions)}
    rows = []
    for spec in args.model or [HALF_WIDTH, "pixels"]:
        for workers in args.workers or [None]:
            kwargs = {"cache": False, "precision": args.precision, "workers": workers}
            if args.batch_size:
                kwargs["batch_size"] = args.batch_size
            options = EvalOptions(**{k: v for k, v in kwargs.items() if k in known})
            row = {**time_extraction(spec, folder, args.image_size, options), "workers": workers,
                   "batch_size": options.batch_size, "precision": args.precision}
            print(row, flush=True)
            rows.append(row)
    common.print_table(rows, ["model", "images", "workers", "batch_size", "precision", "seconds", "images_per_s"])
    common.write_result(args.json, rows, unsupdistill=str(Path(unsupdistill.__file__).parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
