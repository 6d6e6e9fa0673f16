"""A ranking loss for the enhancement map (not in the paper): enhancing voxels above the voxels that do not enhance.

The paper's ROC AUC (Table 3) scores a synthesised T1c by how its enhancement map, post-contrast minus
pre-contrast T1, ranks the voxels that enhance on the full dose (Otsu's threshold of the full dose's
enhancement) above those that do not. The L2 loss does not ask for that ranking: with the ``enhancement``
output the network's gain multiplies the low-dose enhancement, and a gain that varies from voxel to voxel
reorders the weakly enhancing voxels at the threshold (the edges of lesions and vessels), where the squared
error is small because the enhancement is. On the demo's training patients the low dose itself ranked them
better than vir-T1c (out of fold: AUC 99.961 against 99.941 %).

:func:`enhancement_rank_loss` is the pairwise logistic loss of RankNet (Burges et al., ICML 2005) applied to the
Wilcoxon-Mann-Whitney statistic that the AUC is (Yan et al., ICML 2003, "Optimizing classifier performance via
an approximation to the Wilcoxon-Mann-Whitney statistic"): ``τ · softplus((s_n − s_p) / τ)`` averaged over pairs of
an enhancing voxel ``p`` and a non-enhancing voxel ``n``, ``s`` the predicted enhancement. Pairs already far
apart in the right order cost nothing, so only the hardest voxels are paired: the enhancing voxels that the
prediction scores lowest (at most :data:`MAX_POSITIVES`; the demo's 4 mm volumes hold 270-660 of them, a 1 mm
volume 64 times as many) and, ``negatives_per_positive`` per enhancing voxel, the non-enhancing voxels it scores
highest. That bounds a volume's pairs at 17 million (about 70 MB in fp32) on any grid.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

#: Histogram bins of Otsu's threshold, as ``skimage.filters.threshold_otsu`` (the AUC's labels).
OTSU_BINS = 256
#: Temperature of the logistic pair loss, in normalised intensity: a pair ordered right by more than a few τ
#: costs almost nothing. The enhancement at Otsu's threshold is about 0.2 on the demo's normalised scale.
RANK_TEMPERATURE = 0.01
#: Non-enhancing voxels paired with each enhancing voxel: those the prediction scores highest.
NEGATIVES_PER_POSITIVE = 4
#: At most this many enhancing voxels per volume are paired, those the prediction scores lowest.
MAX_POSITIVES = 2048


def otsu_threshold(values: torch.Tensor, bins: int = OTSU_BINS) -> torch.Tensor:
    """Otsu's threshold of ``values`` (any shape), as ``skimage.filters.threshold_otsu(values, nbins=bins)``.

    A ``bins``-bin histogram over [min, max]; the threshold is the centre of the bin that maximises the
    between-class variance of the voxels at or below it against those above. Constant input returns its value.
    """
    v = values.detach().float().reshape(-1)
    lo, hi = v.min(), v.max()
    if lo == hi:
        return lo
    counts = torch.histc(v, bins=bins, min=float(lo), max=float(hi)).double()
    width = (hi - lo).double() / bins
    centres = lo.double() + width * (torch.arange(bins, device=v.device, dtype=torch.float64) + 0.5)
    weight1 = counts.cumsum(0)
    weight2 = counts.flip(0).cumsum(0).flip(0)
    mean1 = (counts * centres).cumsum(0) / weight1
    mean2 = ((counts * centres).flip(0).cumsum(0) / weight2.flip(0)).flip(0)
    # The first bin holds the minimum and the last the maximum, so neither class is ever empty (no 0/0).
    between = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return centres[torch.argmax(between)].to(values.dtype)


def enhancement_rank_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    pre: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = RANK_TEMPERATURE,
    negatives_per_positive: float = NEGATIVES_PER_POSITIVE,
    max_positives: int = MAX_POSITIVES,
) -> torch.Tensor:
    """Pairwise logistic ranking loss of ``pred``'s enhancement against the target's, averaged over the batch.

    All tensors are ``(B, 1, ...)`` (``mask`` > 0.5 selects the voxels, the brain). For each volume the
    positives are the mask voxels whose target enhancement ``max(target − pre, 0)`` lies above its Otsu
    threshold, the labels of the paper's ROC AUC; the score is ``pred − pre``. The ``max_positives`` positives
    scored lowest are each paired with ``negatives_per_positive`` of the negatives scored highest (module
    docstring). A volume without positives (or without negatives) adds 0. Returns a scalar in fp32 with
    gradients to ``pred`` only.
    """
    losses = []
    for p, t, b, m in zip(pred, target, pre, mask, strict=True):
        inside = m > 0.5
        score = (p.float() - b.float())[inside]
        enhancement = (t.float() - b.float()).clamp_min(0.0)[inside]
        if score.numel() == 0:
            continue
        positive = enhancement > otsu_threshold(enhancement)
        pos, neg = score[positive], score[~positive]
        if pos.numel() > max_positives:
            pos = -torch.topk(-pos, max_positives, sorted=False).values
        k = min(int(round(negatives_per_positive * pos.numel())), neg.numel())
        if pos.numel() == 0 or k == 0:
            continue
        hard = torch.topk(neg, k, sorted=False).values
        pairs = (hard[None, :] - pos[:, None]) / temperature
        losses.append(temperature * F.softplus(pairs).mean())
    if not losses:
        return pred.new_zeros((), dtype=torch.float32)
    return torch.stack(losses).sum() / len(pred)
