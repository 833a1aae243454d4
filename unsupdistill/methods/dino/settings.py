"""DINO's settings (the ``dino`` section), torch-free: a recipe loads without importing the method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from unsupdistill.config.sections import CropSpec, ViewSpec

if TYPE_CHECKING:
    from unsupdistill.config import Config


@dataclass
class DINOConfig:
    """DINO's own settings (the ``dino`` section): the loss's temperatures and centring, the EMA teacher's momentum,
    the last layer's freeze, DINOv2's optional terms, the multi-crop views and the projection head. (Old keys are read
    as their ``dino.*`` names with a warning, see :data:`RENAMED`.)"""

    student_temp: float = 0.1
    teacher_temp: float = 0.01
    """Teacher temperature after warmup. DINO uses 0.04 (up to 0.07 when stable) on ImageNet; the
    built-in short run needs a sharper teacher (0.01) to leave the uniform plateau in ~100 steps."""
    warmup_teacher_temp: float = 0.01
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    centering: Literal["ema", "sinkhorn"] = "ema"
    """How the teacher's outputs are centred: ``ema``, DINO's moving-average centre subtracted before the
    softmax; ``sinkhorn``, DINOv2's Sinkhorn-Knopp normalisation of the batch (no centre kept)."""
    sinkhorn_iterations: int = 3
    koleo_weight: float = 0.0
    """Weight of DINOv2's KoLeo regulariser on the student's L2-normalised backbone features of each global
    crop (DINOv2: 0.1); 0 turns it off."""
    ibot_weight: float = 0.0
    """ViTs only: weight of iBOT's masked-patch loss (DINOv2: 1.0); 0 turns it off."""
    ibot_mask_p: float = 0.5
    """Share of global crops whose patches are masked for iBOT."""
    ibot_mask_ratio: tuple[float, float] = (0.1, 0.5)
    """Range of the share of patches masked in a masked crop."""
    ibot_separate_head: bool = False
    """Predict patch tokens through a head of their own instead of the DINO head."""
    teacher_momentum: float = 0.99
    """EMA momentum at step 0, cosine to teacher_momentum_end. DINO: 0.996 for runs of 100k+ steps;
    a short run needs a teacher that follows the student faster."""
    teacher_momentum_end: float = 1.0
    freeze_last_layer_epochs: float = 1.0
    """Epochs at the start whose gradients of the head's last layer are dropped (DINO: 1)."""

    # the multi-crop views (Sec. 3.1): two global ones at model.input_size that differ in blur and solarization, and
    # N smaller local ones; DINO's probabilities and scales (the built-in digits run, recipes/digits.yaml, takes
    # 12 / 6-px crops without flips or colour jitter)
    global_1: ViewSpec = field(default_factory=lambda: ViewSpec(scale=(0.4, 1.0), blur_p=1.0))
    """The first global view (``model.input_size`` px)."""
    global_2: ViewSpec = field(default_factory=lambda: ViewSpec(scale=(0.4, 1.0), blur_p=0.1, solarize_p=0.2))
    """The second global view (``model.input_size`` px)."""
    local: CropSpec = field(default_factory=lambda: CropSpec(size=8, scale=(0.05, 0.4), blur_p=0.5))
    """The local views, ``local.size`` px each."""
    num_local_crops: int = 4
    crop_mode: Literal["slice", "resample"] = "slice"
    """How kornia's RandomResizedCrop resizes a batch: ``slice``, one resize per image; ``resample``, one
    batched perspective warp for all images of a view."""
    low_res_share: float = 0.0
    """Progressive resizing: the share of the planned steps, from the start, whose crops are all
    ``low_res_scale`` times smaller (e.g. 0.5 with 0.75: 24 / 12-px crops, then 32 / 16 px). Low-resolution
    steps cost about scale^2 of a full one, so a time budget buys more of them (planned from the step rate,
    the share is then one of the budget's time); 0 turns it off."""
    low_res_scale: float = 0.75
    """Crop sizes in the low-resolution part of the run, as a share of the configured sizes (rounded)."""

    # the projection head (Sec. 3.1, App. C)
    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    head_output_dim: int = 1024
    """DINO uses 65536 on ImageNet; small data and short runs learn faster with fewer outputs."""
    head_batch_norm: bool = True
    """BatchNorm in the head's MLP: removes the common component of ResNet features (which leaves
    the centred teacher uniform otherwise); DINO turns it off for ViTs."""
    norm_last_layer: bool = True
    """Weight-normalise the head's last layer with a fixed norm (more stable, DINO default)."""

    def checks(self, config: Config) -> list[tuple[bool, str, str]]:
        """(ok, key, what is allowed) for the values types cannot check."""
        return [
            *((getattr(self, key) > 0, f"dino.{key}", "a number > 0")
              for key in ("student_temp", "teacher_temp", "warmup_teacher_temp")),
            (self.warmup_teacher_temp_epochs >= 0, "dino.warmup_teacher_temp_epochs", "an integer >= 0"),
            (0 <= self.center_momentum < 1, "dino.center_momentum", "a number in [0, 1)"),
            (self.sinkhorn_iterations >= 1, "dino.sinkhorn_iterations", "an integer >= 1"),
            (self.koleo_weight >= 0, "dino.koleo_weight", "a number >= 0 (0 turns KoLeo off)"),
            (self.ibot_weight >= 0, "dino.ibot_weight", "a number >= 0 (0 turns iBOT off)"),
            (0 <= self.ibot_mask_p <= 1, "dino.ibot_mask_p", "a probability in [0, 1]"),
            (0 <= self.ibot_mask_ratio[0] <= self.ibot_mask_ratio[1] <= 1, "dino.ibot_mask_ratio",
             "[min, max] with 0 <= min <= max <= 1"),
            (self.freeze_last_layer_epochs >= 0, "dino.freeze_last_layer_epochs", "a number >= 0"),
            (0 <= self.teacher_momentum <= 1, "dino.teacher_momentum", "a number in [0, 1]"),
            (0 <= self.teacher_momentum_end <= 1, "dino.teacher_momentum_end", "a number in [0, 1]"),
            *self.global_1.checks("dino.global_1"), *self.global_2.checks("dino.global_2"),
            *self.local.checks("dino.local"),
            (self.num_local_crops >= 0, "dino.num_local_crops", "an integer >= 0"),
            (self.num_local_crops == 0 or self.local.size <= config.model.input_size, "dino.local.size",
             f"at most the global crop size, model.input_size ({config.model.input_size})"),
            (0 <= self.low_res_share < 1, "dino.low_res_share", "a share of the steps in [0, 1); 0 turns it off"),
            (0 < self.low_res_scale <= 1, "dino.low_res_scale", "a share of the crop sizes in (0, 1]"),
            *((getattr(self, key) >= 1, f"dino.{key}", "an integer >= 1")
              for key in ("head_hidden_dim", "head_bottleneck_dim", "head_output_dim")),
        ]


SECTIONS = {"dino": DINOConfig}
"""The config sections DINO reads besides the shared ones."""

_HEAD = ("head_hidden_dim", "head_bottleneck_dim", "head_output_dim", "head_batch_norm", "norm_last_layer")
RENAMED = {
    "loss": "dino",
    "optim.teacher_momentum": "dino.teacher_momentum",
    "optim.teacher_momentum_end": "dino.teacher_momentum_end",
    "optim.freeze_last_layer_epochs": "dino.freeze_last_layer_epochs",
    # issue 34: the input size, mean and std are the shared model section's; the crops and the head are DINO's
    "augment.global_1.size": "model.input_size",
    "augment.global_2.size": "model.input_size",
    "augment.mean": "model.mean",
    "augment.std": "model.std",
    **{f"augment.{key}": f"dino.{key}" for key in ("global_1", "global_2", "local", "num_local_crops", "crop_mode",
                                                     "low_res_share", "low_res_scale")},
    **{f"model.{key}": f"dino.{key}" for key in _HEAD},
}
"""Keys that moved (old dotted name -> new), read under their new names with a warning."""
