import numpy as np
import pytest
import torch

from orcal.data import agreement_stats


def test_hand_computed_statistics():
    a = np.zeros((3, 2, 4), dtype=np.uint8)
    a[0, 0, :2] = 1       # rater 0: 2 voxels
    a[1, 0, :1] = 1       # rater 1: 1 voxel (inside rater 0's)
    # rater 2: empty
    st = agreement_stats([a, torch.from_numpy(a)])
    # pairs: (0,1) Dice 2*1/3, (0,2) 0, (1,2) 0 -> each image
    assert st["mean_pairwise_dice"] == pytest.approx((2 / 3) / 3)
    assert st["pooled_pairwise_dice"] == pytest.approx(2 / (3 + 2 + 1))
    # union = 2 voxels, both with 0 < k < 3
    assert st["disagreement_fraction"] == 1.0
    assert st["k_hist"] == pytest.approx([6 / 8, 1 / 8, 1 / 8, 0.0])
    assert st["k_hist_union"] == pytest.approx([0.0, 0.5, 0.5, 0.0])
    assert st["empty_fraction_per_rater"] == [0.0, 0.0, 1.0]
    assert st["foreground_fraction_per_rater"] == pytest.approx([2 / 8, 1 / 8, 0.0])
    assert st["n_images"] == 2 and st["raters"] == [3] and st["all_empty_fraction"] == 0.0


def test_full_agreement_and_mixed_rater_counts():
    m = np.ones((2, 3, 3), dtype=bool)
    st = agreement_stats([m, np.zeros((4, 3, 3))])
    assert st["disagreement_fraction"] == 0.0
    assert st["mean_pairwise_dice"] == 1.0  # the empty image's pairs are skipped
    assert st["raters"] == [2, 4] and len(st["k_hist"]) == 5
    assert st["all_empty_fraction"] == 0.5


def test_rejects_masks_without_rater_axis():
    with pytest.raises(ValueError, match="masks"):
        agreement_stats([np.zeros(4)])
