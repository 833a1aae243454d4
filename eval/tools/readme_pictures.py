"""The README's pictures, from the built-in digits: a short run of the default CNN and of a small ViT, then
``unsupdistill show`` on held-out digits (PCA colours, retrieval, training curves; the ViT's attention).

Each run trains for ``--budget`` seconds on all 1,797 digits (no labels); the pictures are drawn on the first
8 digits of the fixed test split, with the 540 test digits as the retrieval gallery, and enlarged 4x (nearest)
for the page. From the repository root::

    python eval/tools/readme_pictures.py --out docs --budget 120
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py and the benchmarks

import common
import numpy as np
from PIL import Image

from unsupdistill.data import DigitsDataset, digits_split

VIT = ["--recipe", "cifar10_vit_cpu", "model.mean=[0.485, 0.456, 0.406]", "model.std=[0.229, 0.224, 0.225]",
       "model.backbone_kwargs={img_size: 32, patch_size: 4, depth: 4, embed_dim: 96, num_heads: 3}",
       "dino.head_hidden_dim=512", "dino.head_bottleneck_dim=128", "dino.head_output_dim=1024",
       "train.batch_size=64", "train.save_every_steps=100000", "data.num_workers=0"]
"""A four-block ViT with 4-px patches at 32 px (an 8x8 grid), the ViT recipe's losses."""


def enlarge(src: Path, dst: Path, factor: int) -> None:
    image = np.asarray(Image.open(src).convert("RGB"))
    Image.fromarray(image.repeat(factor, axis=0).repeat(factor, axis=1)).save(dst, optimize=True)
    print(f"{dst}: {dst.stat().st_size / 1024:.0f} KB")


def main(argv: list[str] | None = None) -> int:
    parser = common.script_parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the PNGs go")
    parser.add_argument("--budget", type=float, default=120, help="training seconds of each run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gallery = work / "test"
        gallery.mkdir()
        _, test_idx = digits_split()
        digits = DigitsDataset(32, test_idx)
        for i in range(len(digits)):
            Image.fromarray(digits[i].permute(1, 2, 0).numpy()).save(gallery / f"{i:04d}.png")
        queries = [str(gallery / f"{i:04d}.png") for i in range(8)]
        budget = f"train.time_budget_s={args.budget}"
        common.run_cli("pretrain", "--out", str(work / "cnn"), budget, "eval.summary=false")
        common.run_cli("pretrain", "--out", str(work / "vit"), *VIT, budget, "eval.summary=false")
        common.run_cli("show", str(work / "cnn"), *queries, "--gallery", str(gallery), "--out", str(work / "cnn-show"))
        common.run_cli("show", str(work / "vit"), *queries, "--kind", "attention", "--kind", "pca", "--out",
                       str(work / "vit-show"))
        enlarge(work / "cnn-show" / "retrieval.png", args.out / "retrieval.png", 3)
        enlarge(work / "vit-show" / "pca.png", args.out / "pca.png", 3)  # the CNN's 2x2 map at 16 px says little
        enlarge(work / "vit-show" / "attention.png", args.out / "attention.png", 3)
        enlarge(work / "cnn" / "training_curves.png", args.out / "training_curves.png", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
