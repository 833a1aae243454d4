"""A distillation teacher's images/s before and after issue 33, on 64 real photos (batch 64), in one process.

Before: eager, channels-last, under bf16 autocast (what ``train.precision=auto`` gave the teacher on any CPU); eager
fp32; after: the path :func:`~unsupdistill.models.inference.fastest_path` chooses. BENCHMARKS.md ("On a folder of
real photos") ran::

    python eval/tools/teacher_speed.py \
        "timm:tf_efficientnet_lite0,pretrained=true,pretrained_cfg_overlay={file: PATH}" \
        "/tmp/clothing-photos/train/*/*.jpg"
"""
import glob
import sys
import time

import torch

from unsupdistill.data.folder import load_rgb, resize_center_crop
from unsupdistill.methods.distill.teacher_pass import SpatialOutput, normalize
from unsupdistill.models.backbone import pooled_and_spatial
from unsupdistill.models.inference import fastest_path
from unsupdistill.models.teachers import load_teacher


def rate(fn, x: torch.Tensor, repeats: int = 2) -> float:
    """Images/s of ``fn`` on ``x``: the best of ``repeats`` timings after one untimed call."""
    fn(x)
    best = 1e9
    for _ in range(repeats):
        tic = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - tic)
    return len(x) / best


def bf16_autocast(backbone: torch.nn.Module):
    def run(x: torch.Tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return pooled_and_spatial(backbone, x)
    return run


torch.set_num_threads(2)
T = sys.argv[1]
paths = sorted(glob.glob(sys.argv[2]))[::40][:64]
for size in (224, 160):
    t = load_teacher(T, size)
    bb = t.backbone.to(memory_format=torch.channels_last)
    imgs = torch.stack([resize_center_crop(load_rgb(p, draft_size=size), size) for p in paths])
    x = normalize(imgs, size, t.mean, t.std)
    with torch.no_grad():
        r_old = rate(bf16_autocast(bb), x, 1)
        r_fp32 = rate(lambda images, net=bb: pooled_and_spatial(net, images), x)
    path = fastest_path(SpatialOutput(bb), x[:16], torch.device("cpu"))
    r_new = rate(path.run, x)
    print(f"{size} px: before (eager, channels-last, bf16 autocast) {r_old:.1f}; eager fp32 channels-last "
          f"{r_fp32:.1f}; after ({path.name}) {r_new:.1f} images/s; after/before {r_new / r_old:.1f}x, "
          f"after/eager fp32 {r_new / r_fp32:.2f}x")
