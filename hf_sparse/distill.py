"""Knowledge distillation for `SparseTrainer`: a teacher's logits (KL at a temperature) and hidden states
(layer-wise mean squared error) added to the task loss.

The teacher is a model the user passes (for example a dense model fine-tuned first) or, with
`distill_from="warmup"`, the model's own dense weights at the end of the importance warm-up (a frozen copy:
no extra run). Its outputs are computed once per micro-batch (or chunk) and shared by every mask's forward
of the step, and the combined loss is what each mask's forward returns: the structure estimator's reward
is the same objective the weights train on, so the estimator stays unbiased for it.

    loss = (1 - alpha) * task + alpha * T^2 * KL(teacher_T || student_T) + hidden_weight * mean_l MSE(h_l, h_l^teacher)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, evaluation-mode copy of a (sparsified) model with every unit kept: the dense teacher."""
    from .structure import SparseStructure

    teacher = copy.deepcopy(model)
    structure = SparseStructure(teacher)
    structure.set_masks(torch.ones(structure.num_units))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def _token_weights(inputs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
    """Per-position weights for sequence logits [b, s, V]: the positions whose next-token label counts."""
    labels = inputs.get("labels")
    if logits.dim() != 3 or not torch.is_tensor(labels) or labels.dim() != 2:
        return None
    weights = torch.zeros(labels.shape, dtype=logits.dtype, device=logits.device)
    weights[:, :-1] = labels[:, 1:].ne(-100).to(logits.dtype)  # causal LM: position t predicts label t + 1
    return weights


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, weights: torch.Tensor | None):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over examples (or weighted positions)."""
    t = float(temperature)
    s_log = F.log_softmax(student.float() / t, -1)
    t_log = F.log_softmax(teacher.float() / t, -1)
    kl = (t_log.exp() * (t_log - s_log)).sum(-1) * t * t
    if weights is None:
        return kl.mean()
    return (kl * weights).sum() / weights.sum().clamp(min=1.0)


def hidden_mse(student: tuple, teacher: tuple, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over layers of the per-token mean squared error of the hidden states (padding excluded)."""
    losses = []
    for hs, ht in zip(student[1:], teacher[1:]):  # the embeddings (index 0) are not pruned
        err = (hs.float() - ht.float()).pow(2).mean(-1)
        if attention_mask is not None and attention_mask.shape == err.shape:
            m = attention_mask.to(err.dtype)
            losses.append((err * m).sum() / m.sum().clamp(min=1.0))
        else:
            losses.append(err.mean())
    return torch.stack(losses).mean()


class Distiller:
    """Teacher outputs, cached for the micro-batch in hand, and the combined loss."""

    def __init__(self, teacher: nn.Module | None, temperature: float, alpha: float, hidden_weight: float):
        self.teacher = teacher
        self.temperature, self.alpha, self.hidden_weight = temperature, alpha, hidden_weight
        self._key = None
        self._out = None
        self.forwards = 0  # teacher forwards run (for the FLOPs count)

    @staticmethod
    def _batch_key(inputs: dict[str, Any]):
        t = next((v for v in inputs.values() if torch.is_tensor(v)), None)
        return None if t is None else (t.data_ptr(), tuple(t.shape), t.device)

    @torch.no_grad()
    def teacher_outputs(self, inputs: dict[str, Any]):
        key = self._batch_key(inputs)
        if key is None or key != self._key:
            feed = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
            self._out = self.teacher(**feed, output_hidden_states=self.hidden_weight > 0)
            self._key = key
            self.forwards += 1
        return self._out

    def forget(self) -> None:
        self._key, self._out = None, None

    def loss(self, task_loss: torch.Tensor, outputs, inputs: dict[str, Any], share: float = 1.0) -> torch.Tensor:
        """`task_loss` as the Trainer normalised it; `share` scales the teacher terms the same way (this
        micro-batch's items over the items the task loss was divided by)."""
        teacher = self.teacher_outputs(inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        kd = logit_kl(logits, teacher.logits.to(logits.device), self.temperature, _token_weights(inputs, logits))
        loss = (1.0 - self.alpha) * task_loss + self.alpha * share * kd
        if self.hidden_weight > 0:
            hidden = outputs["hidden_states"] if isinstance(outputs, dict) else outputs.hidden_states
            loss = loss + self.hidden_weight * share * hidden_mse(hidden, teacher.hidden_states, inputs.get("attention_mask"))
        return loss


def check_teacher(args, teacher_model: nn.Module | None) -> None:
    """A passed teacher means `distill_from="model"`; refuse the two settings that contradict each other."""
    if teacher_model is not None:
        if args.distill_from == "warmup":
            raise ValueError("SparseTrainer got a teacher_model and distill_from='warmup'; choose one (drop "
                             "teacher_model, or set distill_from='model')")
        args.distill_from = "model"
    elif args.distill_from == "model":
        raise ValueError("distill_from='model' needs SparseTrainer(..., teacher_model=...): e.g. the dense model "
                         "fine-tuned first")


def distiller_from_args(args, teacher_model: nn.Module | None) -> Distiller | None:
    """The `Distiller` the arguments ask for (None without distillation); a passed teacher is frozen on the
    training device. The warm-up teacher is set later, when the warm-up ends."""
    if args.distill_from == "none":
        return None
    if teacher_model is not None:
        teacher_model.eval().to(args.device)
        for p in teacher_model.parameters():
            p.requires_grad_(False)
    return Distiller(teacher_model, args.distill_temperature, args.distill_alpha, args.distill_hidden_weight)
