"""How ``unsupdistill eval`` evaluates (torch-free, so the command line's help reads it without loading torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HEADLINE_K = 20
AUTO_BF16_MIN_IMAGES = 10_000
"""precision=auto extracts in bf16 on a CPU with native bf16 from this many scored (test) images on."""


@dataclass
class EvalOptions:
    """How to evaluate; the defaults are the DINO protocol's."""

    image_size: int | None = None
    """Input size for models that do not record one (``pixels``, ``timm:``)."""
    batch_size: int = 256
    precision: str = "auto"
    """fp32, bf16 (autocast) or auto: bf16 on a CPU with native bf16 arithmetic (AVX-512 BF16, AMX) when the test
    split holds 10,000 images or more, else fp32. There bf16 extracts ~2x faster and moved CIFAR-10 k-NN and linear
    top-1 by at most 0.06 points; on digits' 540 test images it moved them by up to 0.9 points (a handful of near
    ties flip either way, so the move shrinks as the test split grows), and small sets extract in seconds anyway
    (BENCHMARKS.md, "Feature precision")."""
    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    linear: bool = True
    linear_backend: str = "torch"
    """torch: a grid of learning rates and weight decays trained at once on the eval device (``linear_grid``);
    sklearn: logistic regression with C chosen on the same held-out split (``linear``), for comparison."""
    clustering: bool = True
    cluster_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    vit_blocks: int | None = None
    """ViTs: concatenate the class tokens of the last n blocks (DINO's linear protocol uses 4)."""
    avgpool: bool = False
    """With vit_blocks: also append the average-pooled patch tokens of the last block."""
    student: bool = False
    cache: bool = True
    cache_dir: Path | None = None
    plots: bool = True
    device: str = "auto"
    """auto (CUDA when available, else the CPU), cpu, cuda or cuda:N."""
    workers: int | None = None
    """DataLoader processes decoding images; None: one per CPU core up to 8 (none for the in-memory digits)."""
    speed: bool = False
    """Also measure the backbone's inference speed (:func:`~unsupdistill.evaluate.speed.measure_speed`) on the eval
    device, at the resolved extraction precision."""
    speed_batch_size: int = 64
    """Images per pass of the throughput timing."""
    speed_seconds: float = 2.0
    """Time limit of each of the two speed timings (throughput, latency)."""
    frontend: dict | None = None
    """A sound front end (a model of sounds' ``frontend`` in its ``backbone.json``) for the models without one of
    their own: ``timm:`` networks of sounds and ``logmel``, the log-mel statistics baseline."""
