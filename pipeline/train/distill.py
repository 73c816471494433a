"""The student and its loss as one module, and where the targets come from (the teacher seam).

A **teacher** is any ``Callable[[batch], KDTargets | ClassTargets]``: given a collated batch
(:mod:`pipeline.train.collate`, already on the training device) it returns the targets at the
batch's target positions — for token caches one row per ``True`` of ``target_mask``, in
row-major order; for ``class_logits`` caches one row per batch row. That is exactly what the
loss consumes. The default is :func:`cached_targets` (the teacher that wrote the cache);
:class:`OnlineTeacher` runs a teacher model in this process instead (online KD), on the same
batches, so offline and online KD differ only in where the targets come from.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from pipeline.train.kd_loss import ClassKDLoss, KDLossOutput, SparseKDLoss
from pipeline.train.losses import ClassTargets, KDTargets

Batch = dict[str, torch.Tensor]
Targets = KDTargets | ClassTargets
Teacher = Callable[[Batch], Targets]

# Mean teacher tail mass above which pure KD from a top-k cache gets a warning: at 0.54 (top-8)
# it lost to cross-entropy in docs/RESULTS.md, at 0.29 (top-64) it still won clearly.
LARGE_TAIL_WARNING = 0.35


def cached_targets(batch: Batch) -> Targets:
    """The cache's own targets of a collated batch, gathered at its target positions."""
    if "class_logits" in batch:
        return ClassTargets(logits=batch["class_logits"], labels=batch["class_labels"])
    mask = batch["target_mask"]
    return KDTargets(ids=batch["ids"][mask], logprobs=batch["logprobs"][mask], tail=batch["tail"][mask],
                     valid=batch["valid"][mask], labels=batch["labels"][mask])


class OnlineTeacher:
    """A teacher model in this process: its full distribution (``k = V``, tail 0) at the batch's
    target positions, or its class logits for a sequence classifier.

    The loss is then the exact full-vocabulary divergence. Memory: ``[N, V]`` float32 log-probs
    per micro-batch (the teacher's forward is not chunked). The model is put in eval mode, frozen,
    and moved to the batch's device on first use.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Targets:
        device = batch["input_ids"].device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if logits.ndim == 2:  # a sequence classifier: [B, C]
            return ClassTargets(logits=logits.float(), labels=batch["class_labels"])
        mask = batch["target_mask"]
        return KDTargets.full_distribution(logits[mask], batch["labels"][mask])


class DistillModule(torch.nn.Module):
    """The student plus its loss: ``forward(batch, targets, normalizer) -> KDLossOutput``.

    For causal LMs only the target positions of the last hidden state go through the output
    head, in chunks (:class:`~pipeline.train.kd_loss.SparseKDLoss`); a sequence classifier's
    logits go to :class:`~pipeline.train.kd_loss.ClassKDLoss`. Whatever accelerate wraps around
    this module (DDP, FSDP) sees one plain forward.
    """

    def __init__(self, student: torch.nn.Module, loss: SparseKDLoss | ClassKDLoss) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        self.classification = isinstance(loss, ClassKDLoss)
        hf = student.get_base_model() if hasattr(student, "get_base_model") else student
        # Lists keep these out of the module tree: they are `student` or inside it, and a second
        # registration would duplicate their weights in every checkpoint.
        self._hf = [hf]
        self._decoder = [None if self.classification else getattr(hf, hf.base_model_prefix)]

    @property
    def decoder(self) -> torch.nn.Module | None:
        """The student's decoder stack (last hidden state), without the output head."""
        return self._decoder[0]

    def forward(self, batch: Batch, targets: Targets, normalizer: float | None = None) -> KDLossOutput:
        """The loss of ``batch`` against ``targets`` (see :data:`Teacher`); sums divided by ``normalizer``."""
        if self.classification:
            logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return self.loss(logits, targets, normalizer=normalizer)
        hidden = self.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state  # [B, T, H]
        # top-1 agreement costs a pass over the logits: only asked for in evaluation
        return self.loss(hidden[batch["target_mask"]], self._hf[0].get_output_embeddings(), targets,
                         normalizer=normalizer, agreement=not self.training)


def warn_if_tail_is_large(batch: dict[str, Any]) -> None:
    """Say so when pure KD is asked of a top-k batch that leaves much mass outside its ids.

    The tail bucket carries the tail's amount, not its shape: with a large tail, pure KD
    measurably lost to cross-entropy in docs/RESULTS.md (top-8, mean tail 0.54).
    """
    mask = batch["target_mask"].bool()
    if not bool(mask.any()):
        return
    mean_tail = float(batch["tail"][mask].float().mean())
    if mean_tail > LARGE_TAIL_WARNING:
        print(f"warning: the cache's teacher keeps {mean_tail:.0%} of its probability outside the stored top-k "
              f"(first batch); with --alpha 0 the student learns little about that mass. Consider --alpha 0.3-0.5, "
              "a larger k, or a `sampled` cache (docs/RESULTS.md)", file=sys.stderr)
