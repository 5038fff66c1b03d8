"""ICMIL's teacher-student loss and TMI's confidence weights: plain tensor maths, no module state."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch.nn.functional as F
from torch import Tensor

__all__ = ["DistillationLoss", "Outputs", "Reduction", "confidence_weights", "distillation_loss"]

Reduction = Literal["batchmean", "mean"]  # per patch (ours), or per element as the authors' code (see the loss)
Outputs = Literal["softmax", "sigmoid"]  # what a head's logits mean: one class of C, or C labels each on its own


class DistillationLoss(NamedTuple):
    total: Tensor
    instance: Tensor  # KL(teacher || student on augmented patches), confidence-weighted
    head: Tensor  # KL(teacher || student head on the teacher's features)
    feature: Tensor  # KL between the softmax of teacher and student reduced features


def _kl_rows(target_logits: Tensor, logits: Tensor, outputs: Outputs = "softmax") -> Tensor:
    """KL(softmax(target) || softmax(logits)) per row, in float32; with "sigmoid", the sum over labels of the
    Bernoulli KL(sigmoid(target) || sigmoid(logits)), which is the softmax KL of each label's logits (0, x)."""
    target_logits, logits = target_logits.float(), logits.float()
    if outputs == "sigmoid":
        log_p, log_not_p = F.logsigmoid(target_logits), F.logsigmoid(-target_logits)
        log_q, log_not_q = F.logsigmoid(logits), F.logsigmoid(-logits)
        return (log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)).sum(-1)
    log_p = F.log_softmax(target_logits, dim=-1)
    log_q = F.log_softmax(logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distillation_loss(
    teacher_logits: Tensor,
    student_logits: Tensor,
    student_head_on_teacher_logits: Tensor,
    teacher_hidden: Tensor | None = None,
    student_hidden: Tensor | None = None,
    *,
    head_weight: float = 0.5,
    feature_weight: float = 0.5,
    weights: Tensor | None = None,
    reduction: Reduction = "batchmean",
    outputs: Outputs = "softmax",
) -> DistillationLoss:
    """ICMIL's teacher-student loss on a batch of B patches.

    With KL(p || q) = sum_c p_c (log p_c - log q_c) and the teacher's distribution p_i always the target:

        L = 1/B sum_i w_i KL(softmax(t_i) || softmax(s_i))
          + head_weight    * 1/B sum_i KL(softmax(t_i) || softmax(u_i))
          + feature_weight * 1/B sum_i KL(softmax(zt_i) || softmax(zs_i))

    t = teacher instance logits (clean patches), s = student head on student features (augmented patches), u =
    student head on the teacher's features, zt / zs = teacher / student reduced features (softmax over feature
    dimensions; which features the student reduces is the caller's `FeatureInput`). `weights` w (default 1) only
    scale the first term's rows. Without reduced features the third term is 0.

    `outputs="sigmoid"` (a multi-label head) puts the Bernoulli KL of each label, summed over labels, in the two
    logit terms: each label's instance logit is a binary teacher of its own (the feature term is unchanged).

    `reduction="batchmean"` (ours) is `F.kl_div(..., reduction="batchmean")`, the KL per patch, as written above.
    `"mean"` is the authors' code, `KLDivLoss(reduction="none")(...).mean()`: the mean over every element, which
    divides the two logit terms by the number of classes C and the feature term by the feature width D, so the
    feature term weighs C/D of what it weighs under batchmean.
    """
    b = teacher_logits.shape[0]

    def per(logits: Tensor) -> int:
        return b if reduction == "batchmean" else b * logits.shape[-1]

    instance_kl = _kl_rows(teacher_logits, student_logits, outputs)
    if weights is not None:
        instance_kl = instance_kl * weights.to(instance_kl.dtype)
    instance = instance_kl.sum() / per(teacher_logits)
    head = _kl_rows(teacher_logits, student_head_on_teacher_logits, outputs).sum() / per(teacher_logits)
    if teacher_hidden is None or student_hidden is None:
        feature = instance.new_zeros(())
    else:
        feature = _kl_rows(teacher_hidden, student_hidden).sum() / per(teacher_hidden)
    return DistillationLoss(instance + head_weight * head + feature_weight * feature, instance, head, feature)


def confidence_weights(scores: Tensor, beta: float | None) -> Tensor:
    """|2a - 1|^beta per patch, TMI ICMIL's confidence weighting, from the teacher's attention `scores` of a batch's
    patches (`Aggregator.attention_scores`).

    (N,) raw scores (ABMIL, CLAM-SB; beta 6 in the paper): a = the scores min-max normalised over the batch, as the
    authors' ABMIL code (`isNorm=False`). (N, T) tiered scores (DTFD-MIL, the authors' "dual" code, beta 2): a = the
    product over tiers of each tier's softmax over the batch, min-max normalised; their DTFD script calls the
    attention with its default softmax, and min-max of a softmax is min-max of exp(score), not of the score.
    Patches the teacher scores lowest or highest count fully; middling ones, whose pseudo-labels are least
    trustworthy, fade out. beta None, or a tier equal on every patch, weigh every patch 1.
    """
    scores = scores.detach().float()
    n = scores.shape[0]
    if beta is None:
        return scores.new_ones(n)
    tiers = scores.unsqueeze(1) if scores.ndim == 1 else scores.softmax(dim=0)
    span = tiers.amax(0) - tiers.amin(0)
    if (span <= 0).any():
        return scores.new_ones(n)
    a = ((tiers - tiers.amin(0)) / span).prod(dim=1)
    return (2 * a - 1).abs().pow(beta)
