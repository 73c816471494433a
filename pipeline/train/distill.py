"""The student and its loss as one module, and where the targets come from (the teacher seam).

A **teacher** is any ``Callable[[batch], PositionTargets | ClassTargets]``: given a collated batch
(:mod:`pipeline.train.collate`, already on the training device) it returns the targets at the
batch's target positions — for token caches one row per ``True`` of ``target_mask``, in
row-major order (a :class:`~pipeline.train.losses.KDTargets`, or a lazy one whose chunks are
computed when the loss asks for them); for ``class_logits`` caches one row per batch row. That
is exactly what the loss consumes. The default is :func:`cached_targets` (the teacher that wrote
the cache); :class:`OnlineTeacher` runs a teacher model in this process instead (online KD), on
the same batches, so offline and online KD differ only in where the targets come from.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from pipeline.train.kd_loss import ClassKDLoss, KDLossOutput, SparseKDLoss
from pipeline.train.losses import ClassTargets, HeadSpec, KDTargets, PositionTargets, scale_logits

Batch = dict[str, torch.Tensor]
Targets = PositionTargets | ClassTargets
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


class TeacherHeadTargets:
    """The teacher's full distribution (``k = V``, tail 0) at ``N`` positions, made one chunk at a time.

    Holds the teacher's last hidden states ``[N, H_t]`` (its own dtype and device); ``targets[chunk]``
    (what :class:`~pipeline.train.kd_loss.SparseKDLoss` asks for per chunk) applies the teacher's
    head to that chunk only, so at most one ``[chunk, V]`` float32 distribution exists, never ``[N, V]``.
    """

    def __init__(self, hidden: torch.Tensor, head: torch.nn.Module, head_spec: HeadSpec, labels: torch.Tensor) -> None:
        self.hidden, self.head, self.head_spec, self.labels = hidden, head, head_spec, labels

    @property
    def num_positions(self) -> int:
        return int(self.hidden.shape[0])

    @torch.no_grad()
    def __getitem__(self, positions: slice) -> KDTargets:
        # the head in the teacher's own dtype, as its forward and the dump compute it; softmax in float32
        logits = scale_logits(self.head(self.hidden[positions]).float(), self.head_spec)
        return KDTargets.full_distribution(logits.to(self.labels.device), self.labels[positions])


class OnlineTeacher:
    """A teacher model in this process: its full distribution at the batch's target positions, or its
    class logits for a sequence classifier.

    The loss is then the exact full-vocabulary divergence. A causal LM's decoder runs once per batch
    and its head is applied chunk by chunk inside the loss (:class:`TeacherHeadTargets`), like the
    student's. The model is put in eval mode and frozen; with ``device`` None it follows the batch
    (moved on first use), otherwise it stays on ``device`` and only hidden states and chunks travel.
    ``head_spec`` is the teacher's output scaling (:func:`pipeline.train.student.head_spec`).
    """

    def __init__(self, model: torch.nn.Module, *, device: torch.device | str | None = None,
                 head_spec: HeadSpec = HeadSpec()) -> None:
        self.model = model.eval().requires_grad_(False)
        self.device = None if device is None else torch.device(device)
        self.head_spec = head_spec
        if self.device is not None:
            self.model.to(self.device)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Targets:
        device = self.device or batch["input_ids"].device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        # the teacher's own dtype: no autocast from a surrounding bf16 context
        with torch.autocast(device_type=device.type, enabled=False):
            if "class_labels" in batch:  # a class_logits batch: the teacher is a sequence classifier
                logits = self.model(**inputs).logits
                return ClassTargets(logits=logits.float().to(batch["input_ids"].device), labels=batch["class_labels"])
            decoder = getattr(self.model, self.model.base_model_prefix)
            hidden = decoder(**inputs, use_cache=False).last_hidden_state  # [B, T, H_t]
        mask = batch["target_mask"]
        return TeacherHeadTargets(hidden[mask.to(device)], self.model.get_output_embeddings(), self.head_spec,
                                  batch["labels"][mask])


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
