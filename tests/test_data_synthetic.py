import numpy as np
import pytest
import torch

from orcal.data import SyntheticMultiRater, agreement_stats, load_dataset, make_synthetic


def test_same_seed_same_output_and_different_seed_differs():
    a = make_synthetic(4, R=3, shape=(32, 32), seed=7)
    b = make_synthetic(4, R=3, shape=(32, 32), seed=7)
    c = make_synthetic(4, R=3, shape=(32, 32), seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.masks, c.masks)


def test_shapes_dtypes_2d_and_3d():
    b = make_synthetic(3, R=4, shape=(24, 20), seed=0)
    assert b.images.shape == (3, 1, 24, 20) and b.images.dtype == np.float32
    assert b.masks.shape == (3, 4, 24, 20) and b.masks.dtype == np.uint8
    assert set(np.unique(b.masks)) <= {0, 1}
    assert b.ambiguity.min() >= 0 and b.ambiguity.max() <= 1
    v = make_synthetic(2, R=3, shape=(12, 16, 16), seed=1)
    assert v.images.shape == (2, 1, 12, 16, 16) and v.masks.shape == (2, 3, 12, 16, 16)
    assert v.masks.any()


def test_dataset_items_match_arrays_and_split_is_disjoint():
    ds = SyntheticMultiRater(n=10, R=3, shape=(16, 16), seed=3)
    arrays = make_synthetic(10, R=3, shape=(16, 16), seed=3)
    item = ds[4]
    assert item["image"].dtype == torch.float32 and item["masks"].dtype == torch.uint8
    np.testing.assert_array_equal(item["masks"].numpy(), arrays.masks[4])
    np.testing.assert_array_equal(item["image"].numpy(), arrays.images[4])
    ids = [set(load_dataset("synthetic", split=s, n=10, shape=(16, 16)).ids)
           for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 10


def test_disagreement_concentrates_at_ambiguous_boundaries():
    b = make_synthetic(40, R=5, shape=(48, 48), seed=0)
    k = b.masks.sum(1)
    disagree = (k > 0) & (k < 5)
    near = np.abs(b.level) < 2.0
    hi, lo = disagree[near & (b.ambiguity > 0.6)].mean(), disagree[near & (b.ambiguity < 0.2)].mean()
    assert hi > lo + 0.15
    # the image shows it: the edge is weaker (smaller intensity step across it) where ambiguity is high
    img = b.images[:, 0]
    step = np.abs(np.diff(img, axis=-1))
    amb = b.ambiguity[..., 1:]
    edge = (np.diff(b.level > 0, axis=-1) != 0)
    assert step[edge & (amb > 0.6)].mean() < step[edge & (amb < 0.2)].mean()
    st = agreement_stats(b.masks)
    assert 0.2 < st["disagreement_fraction"] < 0.95
    fg = st["foreground_fraction_per_rater"]
    assert fg[0] > fg[-1]  # the first rater is generous, the last tight
    assert st["empty_fraction_per_rater"][-1] > st["empty_fraction_per_rater"][0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="R must"):
        make_synthetic(2, R=0)
    with pytest.raises(ValueError, match="shape"):
        make_synthetic(2, shape=(8,))
    with pytest.raises(ValueError, match="task"):
        SyntheticMultiRater(task="cup")
    with pytest.raises(ValueError, match="split"):
        SyntheticMultiRater(split="training")
    with pytest.raises(ValueError, match="empty"):
        SyntheticMultiRater(n=3, split="val", val_fraction=0.0)


def test_several_structures_with_rater_disagreement():
    import orcal
    from orcal.data.synthetic import SyntheticMultiRater

    ds = SyntheticMultiRater(n=12, R=3, shape=(24, 32, 32), num_structures=3, seed=4)
    again = SyntheticMultiRater(n=12, R=3, shape=(24, 32, 32), num_structures=3, seed=4)
    items = [ds[i] for i in range(len(ds))]
    assert torch.equal(items[0]["masks"], again[0]["masks"]) and items[0]["num_structures"] == 3
    assert ds.display_name == "Synthetic (R=3, C=3)"
    labels = torch.stack([it["masks"] for it in items])
    assert labels.shape == (12, 3, 24, 32, 32) and labels.dtype == torch.uint8 and int(labels.max()) == 3
    k = orcal.orc_targets(labels, num_structures=3)
    for c in range(3):
        marked = k[:, c] > 0
        assert marked.flatten(1).any(1).float().mean() > 0.9  # every structure is in (nearly) every case
        agree = (k[:, c][marked] == 3).float().mean()
        assert 0.2 < agree < 0.95  # the raters disagree, at the edges, without disagreeing everywhere
    image = torch.stack([it["image"][0] for it in items])
    inside = [float(image[(k[:, c] == 3)].mean()) for c in range(3)]
    assert inside[1] < inside[0] < inside[2]  # the structures' contrasts tell them apart
    with pytest.raises(ValueError, match="num_structures must be an int in 1..8"):
        SyntheticMultiRater(n=2, num_structures=0)


def test_synthetic_structures_is_a_deprecated_name_of_num_structures():
    """The synthetic loader's count was once ``structures``, the name the other loaders give a label list:
    still accepted for one release (a warning naming num_structures, the same data), refused beside a
    different num_structures, and a label list there says to give the count."""
    from orcal.data import load_dataset
    from orcal.data.synthetic import SyntheticMultiRater

    new = SyntheticMultiRater(n=2, R=3, shape=(8, 12, 12), num_structures=2, seed=1)
    with pytest.warns(DeprecationWarning, match="dataset 'synthetic': structures= is deprecated.*use num_structures="):
        old = load_dataset("synthetic", n=2, R=3, shape=(8, 12, 12), structures=2, seed=1)
    assert old.num_structures == 2 and torch.equal(old[1]["masks"], new[1]["masks"])
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="num_structures=3 and structures=2"):
        SyntheticMultiRater(n=2, num_structures=3, structures=2)
    with pytest.raises(ValueError, match=r"give their number, num_structures=C.*structures=\[1, 2\]"):
        SyntheticMultiRater(n=2, structures=[1, 2])  # what --structures 1,2 hands the loader
