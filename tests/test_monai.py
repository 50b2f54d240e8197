"""orcal.monai with the real MONAI: the rater transforms, the metric protocol, MetaTensors and compile."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import orcal
from orcal.metrics import MultiRaterCalibration

# optional packages: the module skips (never fails to collect) where they are missing, as on the GPU image
nib = pytest.importorskip("nibabel")
monai_data = pytest.importorskip("monai.data")
monai_transforms = pytest.importorskip("monai.transforms")
orcal_monai = pytest.importorskip("orcal.monai")

DataLoader, Dataset, MetaTensor = monai_data.DataLoader, monai_data.Dataset, monai_data.MetaTensor
decollate_batch, list_data_collate = monai_data.decollate_batch, monai_data.list_data_collate
Compose, LoadImaged = monai_transforms.Compose, monai_transforms.LoadImaged
RandCropByPosNegLabeld = monai_transforms.RandCropByPosNegLabeld
MultiRaterCalibrationHandler = orcal_monai.MultiRaterCalibrationHandler
MultiRaterCalibrationMetric = orcal_monai.MultiRaterCalibrationMetric
ORCTargetd, StackRatersd = orcal_monai.ORCTargetd, orcal_monai.StackRatersd

RATERS = ["rater0", "rater1", "rater2"]
SCALARS = ("mr_ece", "mr_ece_l2", "mr_mce", "auc", "brier", "nll", "dice")


def _write_cases(root, n=2, shape=(16, 14, 12), affine=None):
    """NIfTI cases with three raters each: label 2 a box that grows with the rater, label 1 a corner."""
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else affine
    cases = []
    for c in range(n):
        item = {"image": os.path.join(root, f"img{c}.nii.gz")}
        nib.save(nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), affine), item["image"])
        for r, key in enumerate(RATERS):
            lab = np.zeros(shape, np.int16)
            lab[4:9 + r, 5:10, 3:8] = 2
            lab[:3, :3, :3] = 1
            item[key] = os.path.join(root, f"case{c}_{key}.nii.gz")
            nib.save(nib.Nifti1Image(lab, affine), item[key])
        cases.append(item)
    return cases


def _load(cases, *more):
    return Compose([LoadImaged(["image", *RATERS], ensure_channel_first=True), *more])


def test_stack_raters_from_float_label_files(tmp_path):
    cases = _write_cases(str(tmp_path))
    d = _load(cases, StackRatersd(RATERS, label=2))(cases[0])
    assert d["rater0"].dtype == torch.float32  # what LoadImaged gives; the stack is uint8 regardless
    masks, union = d["masks"], d["union"]
    assert isinstance(masks, MetaTensor) and masks.dtype == torch.uint8 and masks.shape == (3, 16, 14, 12)
    assert torch.equal(masks[1], (d["rater1"][0] == 2).to(torch.uint8))
    assert torch.equal(union[0], masks.amax(0)) and union.shape == (1, 16, 14, 12)
    torch.testing.assert_close(torch.as_tensor(masks.affine), torch.as_tensor(d["rater0"].affine))
    assert int(StackRatersd(RATERS, label=[2, 300])(d)["masks"].sum()) == int(masks.sum())  # 300: no voxel
    both = StackRatersd(RATERS, label=[1, 2])(d)["masks"]  # the union of the labels, asked for explicitly
    assert int(both[0].sum()) == int(((d["rater0"] != 0)).sum())
    binary = {key: (d[key] == 2).float() for key in RATERS}  # maps of one label: label=None reads them as they are
    assert torch.equal(StackRatersd(RATERS)(binary)["masks"], masks)
    corner = StackRatersd(RATERS, label=1, union_key=None)(d)
    assert int(corner["masks"].sum()) == 3 * 27 and torch.equal(corner["union"], union)  # union not rewritten


def test_stack_raters_errors(tmp_path):
    cases = _write_cases(str(tmp_path))
    d = _load(cases)(cases[0])
    bad = dict(d, rater1=d["rater1"][:, :8])
    with pytest.raises(ValueError, match="'rater0' and 'rater1' have different shapes"):
        StackRatersd(RATERS, label=2)(bad)
    shifted = d["rater2"].clone()
    shifted.affine = torch.as_tensor(np.diag([1.0, 0.8, 2.0, 1.0]))
    with pytest.raises(ValueError, match="'rater0' and 'rater2' have different affines"):
        StackRatersd(RATERS, label=2)(dict(d, rater2=shifted))
    with pytest.raises(ValueError, match=r"channel-first label map \(1, \*S\)"):
        StackRatersd(RATERS, label=2)(dict(d, rater0=d["rater0"][0]))
    with pytest.raises(KeyError, match="rater0"):
        StackRatersd(RATERS)({"image": d["image"]})
    # label maps of several structures where one is assumed: refused, saying how to choose
    with pytest.raises(ValueError, match=r"several labels \[1, 2\].*label=1.*label=\[1, 2\].*num_classes=2"):
        StackRatersd(RATERS)(d)
    with pytest.raises(TypeError, match="non-integer.*nearest"):  # interpolated label maps
        StackRatersd(RATERS, label=2)(dict(d, rater1=d["rater1"] * 0.5))
    with pytest.raises(TypeError, match="label"):
        StackRatersd(RATERS, label=1.5)
    with pytest.raises(ValueError, match="union_key"):
        StackRatersd(RATERS, name="masks", union_key="masks")
    part = StackRatersd([*RATERS, "rater3"], label=2, allow_missing_keys=True)(d)
    assert part["masks"].shape[0] == 3


def test_crop_by_union_and_vote_counts(tmp_path):
    cases = _write_cases(str(tmp_path))
    transform = _load(cases, StackRatersd(RATERS, label=2), ORCTargetd(),
                      RandCropByPosNegLabeld(["image", "masks", "k"], label_key="union", spatial_size=(6, 6, 6),
                                             pos=1, neg=0, num_samples=3))
    transform.set_random_state(0)
    samples = transform(cases[0])
    for s in samples:
        k = s["k"]
        assert isinstance(k, MetaTensor) and k.dtype == torch.uint8 and k.shape == (1, 6, 6, 6)
        assert torch.equal(k[0], s["masks"].sum(0, dtype=torch.uint8))
        assert int(k.max()) >= 1  # every crop is centred on a voxel some rater marked
    # a crop guided by rater 1's channel (what a plain label stack did) is not what union_key gives
    with pytest.raises(ValueError, match="rater stack"):
        ORCTargetd()({"masks": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="names"):
        ORCTargetd(["a", "b"], name="k")


def _batch(tmp_path, seed=0):
    cases = _write_cases(str(tmp_path), n=3)
    transform = _load(cases, StackRatersd(RATERS, label=2), ORCTargetd(),
                      RandCropByPosNegLabeld(["image", "masks", "k"], label_key="union", spatial_size=(8, 8, 8),
                                             num_samples=2))
    transform.set_random_state(seed)
    loader = DataLoader(Dataset(cases, transform), batch_size=3, collate_fn=list_data_collate)
    return next(iter(loader))


def test_metric_protocol_equals_multi_rater_calibration(tmp_path):
    batch = _batch(tmp_path)
    logits = MetaTensor(torch.randn(6, 4, 8, 8, 8, generator=torch.Generator().manual_seed(1)))
    prob = torch.sigmoid(batch["image"])
    assert isinstance(batch["masks"], MetaTensor) and batch["masks"].shape == (6, 3, 8, 8, 8)

    ref = MultiRaterCalibration()  # batched MetaTensors with per-image metadata
    ref.update(prob[:4], batch["masks"][:4])
    ref.update(prob[4:], batch["masks"][4:])
    expected = ref.compute()

    on_masks = MultiRaterCalibrationMetric()
    on_masks(prob[:4], batch["masks"][:4])  # batch-first tensors
    on_masks(decollate_batch(prob[4:]), decollate_batch(batch["masks"][4:]))  # lists of channel-first ones
    on_k = MultiRaterCalibrationMetric(num_raters=3)
    on_k(prob, batch["k"])
    for metric in (on_masks, on_k):
        got = metric.aggregate()
        assert got["n_images"] == 6 and got["n_pairs"] == expected["n_pairs"]
        for key in SCALARS:
            assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    boot = on_masks.bootstrap(n_boot=20)
    assert set(SCALARS) <= set(boot)

    ordinal = MultiRaterCalibrationMetric(kind="ordinal", readout="expected", num_raters=3)
    ordinal(logits, batch["k"])
    ref = MultiRaterCalibration(kind="ordinal", readout="expected")
    ref.update(logits, batch["masks"])
    assert ordinal.aggregate()["mr_ece"] == pytest.approx(ref.compute()["mr_ece"], rel=1e-9)

    # valid masks: batch-first, or one per image with decollated lists; an empty batch adds nothing
    valid = batch["k"][:, 0] != 1
    ref = MultiRaterCalibration()
    ref.update(prob, batch["masks"], valid=valid)
    with_valid = MultiRaterCalibrationMetric()
    with_valid(prob[:2], batch["masks"][:2], valid=valid[:2])
    with_valid(decollate_batch(prob[2:]), decollate_batch(batch["masks"][2:]), valid=valid[2:])
    with_valid(prob[:0], batch["masks"][:0])
    assert with_valid.aggregate()["mr_ece"] == pytest.approx(ref.compute()["mr_ece"], rel=1e-9)
    assert with_valid.aggregate()["n_images"] == 6

    on_k.reset()
    with pytest.raises(RuntimeError, match="before any"):
        on_k.aggregate()
    with pytest.raises(ValueError, match="needs the raters"):
        on_k(prob)
    with pytest.raises(ValueError, match="kind"):
        MultiRaterCalibrationMetric(kind="probability")


def test_mr_ece_per_image_equals_monai_calibration_error_with_soft_targets():
    """docs/integrations.md: per image, MR-ECE is MONAI's ECE against y = k / R (same bins)."""
    metrics = pytest.importorskip("monai.metrics")
    if not hasattr(metrics, "CalibrationErrorMetric"):
        pytest.skip("this MONAI has no CalibrationErrorMetric")
    g = torch.Generator().manual_seed(2)
    p = torch.rand(3, 1, 12, 10, 6, generator=g)
    k = torch.randint(0, 5, (3, 1, 12, 10, 6), generator=g)
    monai_ece = metrics.CalibrationErrorMetric(num_bins=15, include_background=True, metric_reduction="none")
    monai_ece(p, k / 4)
    per_image = monai_ece.aggregate().flatten()
    for i in range(3):
        ours = MultiRaterCalibrationMetric(num_raters=4)
        ours(p[i:i + 1], k[i:i + 1])
        assert ours.aggregate()["mr_ece"] == pytest.approx(float(per_image[i]), abs=1e-6)
    pooled = MultiRaterCalibrationMetric(num_raters=4)
    pooled(p, k)  # pooled over pairs: not MONAI's mean over images
    assert pooled.aggregate()["mr_ece"] <= float(per_image.mean()) + 1e-9


def test_engine_handler_reports_the_pooled_value(tmp_path):
    ignite = pytest.importorskip("ignite.engine")
    batch = _batch(tmp_path)
    prob = torch.sigmoid(batch["image"])
    chunks = [(prob[:3], batch["masks"][:3]), (prob[3:], batch["masks"][3:])]
    engine = ignite.Engine(lambda engine, item: item)
    MultiRaterCalibrationHandler().attach(engine, "mr_ece")
    MultiRaterCalibrationHandler(key="auc").attach(engine, "auc")
    engine.run(chunks)
    ref = MultiRaterCalibration()
    for p, m in chunks:
        ref.update(p, m)
    assert engine.state.metrics["mr_ece"] == pytest.approx(ref.compute()["mr_ece"], rel=1e-9)
    assert engine.state.metrics["auc"] == pytest.approx(ref.compute()["auc"], rel=1e-9)
    with pytest.raises(ValueError, match="key"):
        MultiRaterCalibrationHandler(key="ece")
    from ignite.exceptions import NotComputableError

    empty = ignite.Engine(lambda engine, item: item)
    MultiRaterCalibrationHandler().attach(empty, "mr_ece")
    with pytest.raises(NotComputableError):
        empty.run([(prob[:0], batch["masks"][:0])])


def test_losses_and_ops_take_metatensors_eager_and_compiled(tmp_path):
    batch = _batch(tmp_path)
    g = torch.Generator().manual_seed(3)
    logits = MetaTensor(torch.randn(6, 4, 8, 8, 8, generator=g)).requires_grad_()
    k = batch["k"]
    plain = logits.as_tensor().detach().requires_grad_()
    expected = orcal.ordinal_loss(plain, k.as_tensor()[:, 0])
    expected.backward()
    loss = orcal.OrdinalLoss()(logits, k)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits.grad.as_subclass(torch.Tensor), plain.grad)
    from_masks = orcal.OrdinalLoss(from_masks=True)(logits, batch["masks"])
    torch.testing.assert_close(from_masks, expected)

    torch._dynamo.reset()
    compiled = torch.compile(orcal.OrdinalLoss(), fullgraph=True)
    torch.testing.assert_close(compiled(logits, k), expected)
    fp = torch.compile(lambda x: orcal.foreground_probability(x, "expected"), fullgraph=True)(logits.detach())
    torch.testing.assert_close(fp, orcal.foreground_probability(plain.detach(), "expected"))
    stats = torch.compile(lambda x, y: orcal.calibration_stats(x, y, num_raters=3, kind="ordinal").pack(),
                          fullgraph=True)(logits.detach(), k)
    ref = orcal.calibration_stats(plain.detach(), k.as_tensor()[:, 0], num_raters=3, kind="ordinal").pack()
    assert torch.equal(stats[0], ref[0])
    if orcal.build_info()["compiled"]:  # the fused kernels cannot take a subclass inside a graph: said so
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"as_tensor\(\)"):
            torch.compile(lambda x: orcal.foreground_probability(x, backend="cpp"), fullgraph=True)(logits.detach())


def _rank_main(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(5)
        p = torch.rand(5, 1, 6, 6, 4, generator=g)
        masks = (torch.rand(5, 3, 6, 6, 4, generator=g) < p).to(torch.uint8)
        metric = MultiRaterCalibrationMetric()
        part = slice(0, 2) if rank == 0 else slice(2, 5)  # unequal shares
        metric(p[part], masks[part])
        alone = MultiRaterCalibrationMetric()  # rank 1 sees no image (only an empty batch) yet joins the gather
        alone(p if rank == 0 else p[:0], masks if rank == 0 else masks[:0])
        torch.save((metric.aggregate()["mr_ece"], alone.aggregate()["mr_ece"]),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_monai_gather_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(5)
    p = torch.rand(5, 1, 6, 6, 4, generator=g)
    masks = (torch.rand(5, 3, 6, 6, 4, generator=g) < p).to(torch.uint8)
    ref = MultiRaterCalibration()
    ref.update(p, masks)
    for rank in range(2):
        shared, alone = torch.load(tmp_path / f"rank{rank}.pt")
        assert shared == pytest.approx(ref.compute()["mr_ece"], rel=1e-12)
        assert alone == pytest.approx(ref.compute()["mr_ece"], rel=1e-12)


def test_several_structures_through_monai_transforms(tmp_path):
    """StackRatersd(structures=...) and ORCTargetd(num_classes=...) give (C, *S) vote counts that the loss and
    calibration_stats read as several structures (SPEC §11)."""
    cases = _write_cases(str(tmp_path))
    pipeline = _load(cases, StackRatersd(RATERS, structures=[2, 1]), ORCTargetd(num_classes=2))
    items = [pipeline(c) for c in cases]
    d = items[0]
    labels, k = d["masks"], d["k"]
    assert isinstance(k, MetaTensor) and k.shape == (2, 16, 14, 12) and k.dtype == torch.uint8
    assert isinstance(labels, MetaTensor) and int(labels.max()) == 2
    assert torch.equal(k[0], (torch.stack([d[r][0] for r in RATERS]) == 2).sum(0, dtype=torch.uint8))
    corner = torch.zeros(16, 14, 12, dtype=torch.uint8)
    corner[:3, :3, :3] = 3  # label 1, the second structure, is the corner every rater marks
    assert torch.equal(torch.as_tensor(k[1]), corner)
    assert torch.equal(torch.as_tensor(k), orcal.orc_targets(torch.as_tensor(labels)[None], num_classes=2)[0])
    batch_k = torch.stack([it["k"] for it in items])  # (B, C, *S), as a DataLoader would batch it
    logits = torch.randn(2, 2 * 4, 16, 14, 12, requires_grad=True)
    loss = orcal.ordinal_loss(logits, batch_k)
    per = sum(orcal.ordinal_loss(logits[:, 4 * c:4 * c + 4], torch.as_tensor(batch_k[:, c])) for c in range(2))
    torch.testing.assert_close(loss, per)
    loss.backward()
    st = orcal.calibration_stats(logits.detach(), batch_k, num_raters=3, kind="ordinal")
    want = orcal.calibration_metrics(st)
    assert st.num_structures == 2 and "mr_ece/2" in want
    metric = orcal_monai.MultiRaterCalibrationMetric(kind="ordinal", num_raters=3, num_structures=2)
    metric(logits.detach()[:1], batch_k[:1])
    metric(list(logits.detach()[1:]), list(batch_k[1:]))  # decollated, as MONAI's loops hand them over
    got = metric.aggregate()
    assert got["n_images"] == 2 and got["mr_ece/2"] == pytest.approx(want["mr_ece/2"])
    assert metric.stats().num_structures == 2
    with pytest.raises(ValueError, match="not both"):
        StackRatersd(RATERS, label=1, structures=[1])
    with pytest.raises(ValueError, match="distinct positive labels"):
        StackRatersd(RATERS, structures=[0, 1])
    with pytest.raises(ValueError, match=r"labels up to 2.*num_classes=1 counts labels 1..1 only"):
        ORCTargetd(num_classes=1)(d)  # the stack holds labels 1 and 2
