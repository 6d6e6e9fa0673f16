"""The enhancement ranking loss: Otsu's labels as the AUC's, the pair loss by hand, its gradient's direction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu
from sklearn.metrics import roc_auc_score

from virtual_contrast.model.ranking import enhancement_rank_loss, otsu_threshold


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_threshold_is_skimages(seed):
    rng = np.random.default_rng(seed)
    # Mostly non-enhancing brain near 0 and a few enhancing voxels, like an enhancement map.
    values = np.concatenate([rng.gamma(1.0, 0.02, 5000), rng.normal(0.4, 0.08, 200)]).astype(
        np.float32
    )
    values = np.clip(values, 0, None)
    expected = threshold_otsu(values)
    got = float(otsu_threshold(torch.from_numpy(values)))
    bin_width = (values.max() - values.min()) / 256
    assert abs(got - expected) < 1e-3 * bin_width
    assert 0.05 < got < 0.35  # between the two populations, not a trivial bin


def test_otsu_threshold_of_a_constant_is_that_constant():
    assert float(otsu_threshold(torch.full((10,), 0.3))) == pytest.approx(0.3)


def _volumes(score_pos, score_neg):
    """One volume of 2 enhancing and 3 non-enhancing voxels (pre = 0), plus one voxel outside the mask."""
    target = torch.tensor([0.8, 0.8, 0.0, 0.0, 0.0, 0.9])
    pred = torch.tensor([*score_pos, *score_neg, 0.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    shape = (1, 1, 6)
    return pred.reshape(shape), target.reshape(shape), torch.zeros(shape), mask.reshape(shape)


def test_rank_loss_by_hand():
    tau = 0.1
    pred, target, pre, mask = _volumes([0.5, 0.2], [0.3, 0.1, 0.0])
    # Otsu splits {0.8, 0.8} from {0, 0, 0}; one negative per positive -> the 2 highest: 0.3 and 0.1.
    pairs = [(0.3 - 0.5), (0.1 - 0.5), (0.3 - 0.2), (0.1 - 0.2)]
    expected = tau * np.mean([math.log1p(math.exp(d / tau)) for d in pairs])
    loss = enhancement_rank_loss(pred, target, pre, mask, temperature=tau, negatives_per_positive=1)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # The voxel outside the mask (target 0.9) is neither a positive nor a negative: moving it changes nothing.
    pred2 = pred.clone()
    pred2[..., 5] = 5.0
    loss2 = enhancement_rank_loss(
        pred2, target, pre, mask, temperature=tau, negatives_per_positive=1
    )
    assert float(loss2) == pytest.approx(float(loss))
    # With one positive kept, the one scored lowest (0.2) is paired with the highest negative (0.3).
    capped = enhancement_rank_loss(
        pred, target, pre, mask, temperature=tau, negatives_per_positive=1, max_positives=1
    )
    assert float(capped) == pytest.approx(tau * math.log1p(math.exp((0.3 - 0.2) / tau)), rel=1e-5)


def test_rank_loss_falls_as_the_auc_rises_and_its_gradient_reorders():
    tau = 0.05
    misordered = _volumes([0.1, 0.2], [0.3, 0.25, 0.0])
    ordered = _volumes([0.6, 0.7], [0.3, 0.25, 0.0])
    losses = []
    for pred, target, pre, mask in (misordered, ordered):
        labels = (target[mask > 0.5] > 0.4).numpy()
        auc = roc_auc_score(labels, (pred - pre)[mask > 0.5].numpy())
        losses.append((auc, float(enhancement_rank_loss(pred, target, pre, mask, temperature=tau))))
    (auc_bad, loss_bad), (auc_good, loss_good) = losses
    assert auc_bad < auc_good == 1.0
    assert loss_good < 0.01 * loss_bad

    pred, target, pre, mask = misordered
    pred = pred.clone().requires_grad_(True)
    enhancement_rank_loss(pred, target, pre, mask, temperature=tau).backward()
    grad = pred.grad.flatten()
    assert (grad[:2] < 0).all()  # descent raises the enhancing voxels' scores
    assert (grad[2:4] > 0).all()  # and lowers the non-enhancing voxels that outrank them
    assert grad[5] == 0  # outside the mask


def test_rank_loss_is_zero_without_enhancement_and_averages_over_the_batch():
    pred, target, pre, mask = _volumes([0.1, 0.2], [0.3, 0.25, 0.0])
    flat = torch.zeros_like(target)
    assert float(enhancement_rank_loss(pred, flat, pre, mask)) == 0.0
    one = enhancement_rank_loss(pred, target, pre, mask)
    batch = enhancement_rank_loss(
        torch.cat([pred, pred]),
        torch.cat([target, flat]),
        torch.cat([pre, pre]),
        torch.cat([mask, mask]),
    )
    assert float(batch) == pytest.approx(float(one) / 2)
