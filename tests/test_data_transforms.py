import pytest
import torch

from orcal.data import (
    CenterCrop,
    Compose,
    IntensityScale,
    RandomCrop,
    RandomFlip,
    RandomPatch,
    RandomRot90,
    SlidingWindow,
    augment_2d,
    collate,
    sliding_window_inference,
)


def _item(shape, R=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand((R,) + shape, generator=g) > 0.6).to(torch.uint8)
    # the image equals the masks (one channel per rater) so alignment is checked voxel by voxel
    return {"image": masks.float(), "masks": masks, "valid": masks[0] > 0, "id": "x"}


def _aligned(item):
    same_image = torch.equal(item["image"], item["masks"].float())
    return same_image and torch.equal(item["valid"], item["masks"][0] > 0)


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 7)])
def test_random_spatial_transforms_keep_alignment(shape):
    g = torch.Generator().manual_seed(1)
    t = Compose([RandomFlip(generator=g), RandomRot90(generator=g), RandomCrop(4, generator=g)])
    for seed in range(8):
        out = t(_item(shape, seed=seed))
        assert _aligned(out) and out["masks"].shape[1:] == (4,) * len(shape)
        assert out["id"] == "x"


def test_flip_and_rotation_actually_move_voxels_and_are_seeded():
    item = _item((6, 6))
    outs = [RandomRot90(generator=torch.Generator().manual_seed(s))(item)["masks"] for s in range(12)]
    assert any(not torch.equal(o, item["masks"]) for o in outs)
    a = RandomFlip(generator=torch.Generator().manual_seed(5))(item)
    b = RandomFlip(generator=torch.Generator().manual_seed(5))(item)
    assert torch.equal(a["masks"], b["masks"])
    assert torch.equal(RandomFlip(p=1.0)(item)["masks"], torch.flip(item["masks"], [-2, -1]))


def test_crop_pads_small_inputs_and_marks_padding_invalid():
    item = {"image": torch.ones(1, 3, 5), "masks": torch.ones(2, 3, 5, dtype=torch.uint8)}
    out = CenterCrop((6, 6))(item)
    assert out["image"].shape == (1, 6, 6) and out["masks"].shape == (2, 6, 6)
    assert out["valid"].dtype == torch.bool and int(out["valid"].sum()) == 15
    assert torch.equal(out["masks"][0].bool(), out["valid"])
    assert torch.equal(out["image"][0].bool(), out["valid"])


def test_foreground_patch_centres_on_marked_voxels():
    masks = torch.zeros(2, 16, 16, 16, dtype=torch.uint8)
    masks[1, 12, 3, 9] = 1  # one voxel marked by one rater
    item = {"image": masks[1:].float(), "masks": masks}
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        out = RandomPatch(4, fg_prob=1.0, generator=g)(item)
        assert out["masks"].shape == (2, 4, 4, 4) and int(out["masks"].sum()) == 1
        assert torch.equal(out["image"][0], out["masks"][1].float())
    hits = sum(int(RandomPatch(4, fg_prob=0.0, generator=g)(item)["masks"].sum()) for _ in range(40))
    assert hits < 40


def test_intensity_scale_touches_only_the_image():
    item = _item((5, 5))
    out = IntensityScale(scale=(2.0, 2.0), shift=(1.0, 1.0))(item)
    assert torch.equal(out["image"], item["image"] * 2 + 1)
    assert torch.equal(out["masks"], item["masks"]) and torch.equal(out["valid"], item["valid"])
    assert _aligned(augment_2d(generator=torch.Generator().manual_seed(0)).transforms[0](item))


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_sliding_window_weights_sum_to_one_and_identity_is_exact(blend, overlap):
    shape = (9, 13, 6)
    sw = SlidingWindow((4, 5, 6), overlap=overlap, blend=blend)
    tiles = sw.tiles(shape)
    covered = torch.zeros(shape, dtype=torch.int64)
    for t in tiles:
        covered[t] += 1
    assert int(covered.min()) >= 1  # every voxel in some tile
    w = sw.window(shape)
    total = sw.weight_sum(shape)
    normalised = torch.zeros(shape, dtype=torch.float64)
    for t in tiles:
        normalised[t] += w / total[t]
    torch.testing.assert_close(normalised, torch.ones(shape, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(2, 3, *shape)
    y = sliding_window_inference(x, lambda p: p, (4, 5, 6), overlap=overlap, blend=blend, batch_size=3)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


def test_sliding_window_pads_volumes_smaller_than_the_patch_and_maps_channels():
    x = torch.randn(1, 1, 3, 10, 4)
    y = sliding_window_inference(x, lambda p: torch.cat([p, 2 * p], dim=1), (4, 4, 4))
    assert y.shape == (1, 2, 3, 10, 4)
    torch.testing.assert_close(y[:, 1], 2 * x[:, 0], rtol=0, atol=1e-6)


def test_sliding_window_bad_arguments():
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindow(4, overlap=1.0)
    with pytest.raises(ValueError, match="blend"):
        SlidingWindow(4, blend="linear")
    with pytest.raises(ValueError, match="predictor"):
        sliding_window_inference(torch.zeros(1, 1, 8, 8), lambda p: p[..., :2], 4)
    with pytest.raises(ValueError, match="predictor"):  # a predictor that changes the batch size
        sliding_window_inference(torch.zeros(1, 1, 8, 8), lambda p: torch.cat([p, p]), 4)


def test_collate_fills_valid_for_unpadded_items():
    small = CenterCrop(4)({"image": torch.ones(1, 3, 4), "masks": torch.ones(2, 3, 4, dtype=torch.uint8),
                           "id": "a"})
    full = {"image": torch.ones(1, 4, 4), "masks": torch.ones(2, 4, 4, dtype=torch.uint8), "id": "b"}
    batch = collate([small, full])
    assert batch["image"].shape == (2, 1, 4, 4) and batch["masks"].shape == (2, 2, 4, 4)
    assert batch["id"] == ["a", "b"]
    assert int(batch["valid"][0].sum()) == 12 and bool(batch["valid"][1].all())
    with pytest.raises(ValueError, match="batch"):
        collate([])
