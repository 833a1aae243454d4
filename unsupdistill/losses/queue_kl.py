"""KL divergence between teacher and student similarities to a queue of past teacher embeddings.

The global term of LightlyTrain's ``distillation`` method (``DistillationLoss`` in
``lightly_train/_methods/distillation/``, also the global term of ``distillationv3``), which follows
Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and consistent"
(https://arxiv.org/abs/2106.05237) but needs no labels: the queued teacher embeddings act as the
weights of a pseudo classifier, and the student must reproduce the teacher's soft pseudo labels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# LightlyTrain's ``DistillationArgs.resolve_auto`` rule for ``queue_size="auto"``: the first bucket whose
# dataset-size threshold is above the number of images (``lightly_train._scaling.get_bucket_value``).
QUEUE_SIZE_BUCKETS: tuple[tuple[float, int], ...] = (
    (50, 16),
    (100, 32),
    (250, 64),
    (500, 128),
    (1_000, 256),
    (2_000, 512),
    (4_000, 1024),
    (10_000, 2048),
    (20_000, 4096),
    (float("inf"), 8192),
)


def default_queue_size(num_images: int) -> int:
    """Queue size for a dataset, LightlyTrain's ``queue_size="auto"`` rule.

    8192 embeddings (LightlyTrain's default) from 20,000 images up; smaller datasets get a smaller queue,
    roughly 50% of the smallest and 25% of the largest dataset size in each bucket (16 below 50 images,
    32 below 100, 64 below 250, ..., 4096 below 20,000), so the pseudo classifier is not dominated by
    near-copies of the same few images seen again and again.

    Args:
        num_images: Number of images in the training set.

    Returns:
        The number of teacher embeddings to keep.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    return next(size for threshold, size in QUEUE_SIZE_BUCKETS if num_images < threshold)


class QueueKLLoss(nn.Module):
    """KL(teacher || student) of softmaxed similarities to a FIFO queue of teacher embeddings.

    Both embeddings are L2-normalised and compared with the *support*: the current batch's normalised
    teacher embeddings followed by the stored ones, newest first, ``queue_size`` rows in all. This is
    LightlyTrain's support, where the batch is enqueued before the loss; here the caller enqueues with
    :meth:`push` after the optimizer step, so the support is assembled in :meth:`forward` instead. Only
    filled rows count (LightlyTrain starts from a zero queue whose empty rows add constant logits);
    before the first push the support is the batch alone.

    ``loss = KL(softmax(t @ S.T / T) || softmax(s @ S.T / T))``, summed over the support and averaged
    over the batch (``batchmean``). The teacher gets no gradient.

    In a distributed run :meth:`push` all-gathers the batch, so every process holds the same global
    queue (LightlyTrain keeps one queue per GPU, filled with the local batch only).

    Args:
        dim: Width D of the teacher embeddings (the student is projected to it by the caller).
        queue_size: Number Q of stored teacher embeddings; see :func:`default_queue_size`.
        temperature: Softmax temperature of both distributions (LightlyTrain: 0.07).
    """

    queue: Tensor
    queue_ptr: Tensor
    queue_filled: Tensor

    def __init__(self, dim: int, queue_size: int, temperature: float = 0.07) -> None:
        super().__init__()
        if dim < 1 or queue_size < 1:
            raise ValueError(f"dim and queue_size must be positive, got dim={dim}, queue_size={queue_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.register_buffer("queue", torch.zeros(queue_size, dim))  # (Q, D), L2-normalised rows
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next row to write
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # rows written so far, <= Q

    @property
    def queue_size(self) -> int:
        return self.queue.shape[0]

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """KL divergence of the student's queue similarities from the teacher's.

        Args:
            student: Student embeddings, already projected to the teacher's width, shape (B, D).
            teacher: Teacher embeddings of the same images, shape (B, D).

        Returns:
            The scalar loss; 0 when student and teacher point the same way.
        """
        self._check(student, "student")
        self._check(teacher, "teacher")
        with torch.no_grad():
            teacher = F.normalize(teacher.float(), dim=-1)  # (B, D)
            support = self._support(teacher)  # (S, D), S <= Q
            teacher_log_probs = F.log_softmax(teacher @ support.T / self.temperature, dim=-1)  # (B, S)
        student = F.normalize(student.float(), dim=-1)  # (B, D)
        student_log_probs = F.log_softmax(student @ support.T / self.temperature, dim=-1)  # (B, S)
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)

    @torch.no_grad()
    def push(self, teacher: Tensor) -> None:
        """Enqueue the batch's normalised teacher embeddings (of all processes), overwriting the oldest.

        Args:
            teacher: Teacher embeddings, shape (B, D); every process must pass the same B.
        """
        self._check(teacher, "teacher")
        teacher = F.normalize(teacher.detach().float(), dim=-1)  # (B, D)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = teacher.new_empty(dist.get_world_size() * teacher.shape[0], teacher.shape[1])
            dist.all_gather_into_tensor(gathered, teacher.contiguous())
            teacher = gathered  # (world * B, D), rank-major
        teacher = teacher[-self.queue_size:]  # a batch larger than the queue keeps its last Q rows
        n = teacher.shape[0]
        rows = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % self.queue_size  # (n,)
        self.queue[rows] = teacher.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue_size)
        self.queue_filled.add_(n).clamp_(max=self.queue_size)

    def _support(self, teacher: Tensor) -> Tensor:
        """The batch's normalised teacher embeddings (B, D), then the newest stored ones: (min(Q, B + filled), D)."""
        num_stored = max(0, min(int(self.queue_filled), self.queue_size - teacher.shape[0]))
        newest_first = (self.queue_ptr - 1 - torch.arange(num_stored, device=self.queue.device)) % self.queue_size
        return torch.cat([teacher[: self.queue_size], self.queue[newest_first].float()])

    def _check(self, x: Tensor, name: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.queue.shape[1]:
            raise ValueError(f"expected {name} of shape (B, {self.queue.shape[1]}), got {tuple(x.shape)}")
