"""orcal.integrations.monai with the real MONAI: the rater transforms, the metric protocol, MetaTensors and compile."""

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
orcal_monai = pytest.importorskip("orcal.integrations.monai")

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
    with pytest.raises(ValueError, match=r"several labels \[1, 2\].*label=1.*label=\[1, 2\].*num_structures=2"):
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
    """StackRatersd(structures=...) and ORCTargetd(num_structures=...) give (C, *S) vote counts that the loss and
    calibration_stats read as several structures (SPEC §11)."""
    cases = _write_cases(str(tmp_path))
    pipeline = _load(cases, StackRatersd(RATERS, structures=[2, 1]), ORCTargetd(num_structures=2))
    items = [pipeline(c) for c in cases]
    d = items[0]
    labels, k = d["masks"], d["k"]
    assert isinstance(k, MetaTensor) and k.shape == (2, 16, 14, 12) and k.dtype == torch.uint8
    assert isinstance(labels, MetaTensor) and int(labels.max()) == 2
    assert torch.equal(k[0], (torch.stack([d[r][0] for r in RATERS]) == 2).sum(0, dtype=torch.uint8))
    corner = torch.zeros(16, 14, 12, dtype=torch.uint8)
    corner[:3, :3, :3] = 3  # label 1, the second structure, is the corner every rater marks
    assert torch.equal(torch.as_tensor(k[1]), corner)
    assert torch.equal(torch.as_tensor(k), orcal.orc_targets(torch.as_tensor(labels)[None], num_structures=2)[0])
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
    with pytest.raises(ValueError, match=r"labels up to 2.*num_structures=1 counts labels 1..1 only"):
        ORCTargetd(num_structures=1)(d)  # the stack holds labels 1 and 2


# --- the seams where a MONAI pipeline would train or evaluate the wrong thing without a word ---------------

def _structure_cases(root, shape=(20, 16, 12)):
    """One case, three raters, structures 1 (a box near the origin) and 2 (a box at the far corner)."""
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    item = {"image": os.path.join(root, "img.nii.gz")}
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=shape).astype(np.float32), affine), item["image"])
    for r, key in enumerate(RATERS):
        lab = np.zeros(shape, np.int16)
        lab[1:4, 1:4, 1:4] = 1
        lab[14:18 + r % 2, 10:14, 7:11] = 2
        item[key] = os.path.join(root, f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), item[key])
    return [item]


def test_forgotten_structure_count_is_refused(tmp_path):
    """Rater label maps of several structures, read as one structure, or a head sized for other raters:
    refused, saying which number to give."""
    cases = _structure_cases(str(tmp_path))
    stacked = _load(cases, StackRatersd(RATERS, structures=[1, 2]))(cases[0])
    with pytest.raises(ValueError, match=r"labels up to 2.*pass num_structures=2.*StackRatersd\(label=\.\.\.\)"):
        ORCTargetd()(stacked)  # without num_structures: any structure counted into one k before
    with pytest.raises(ValueError, match="several labels"):
        StackRatersd(RATERS)(_load(cases)(cases[0]))  # label=None on maps of two structures
    assert _load(cases, StackRatersd(RATERS, label=[1, 2]), ORCTargetd())(cases[0])["k"].shape[0] == 1  # asked
    k = ORCTargetd(num_structures=2, num_raters=3)(stacked)["k"]
    assert k.shape == (2, 20, 16, 12)
    with pytest.raises(ValueError, match="holds 3 raters.*num_raters = 4"):
        ORCTargetd(num_structures=2, num_raters=4)(stacked)

    batch_k = k[None]
    head = torch.randn(1, 12, 20, 16, 12)  # 12 channels: C * (R + 1) for C = 3, or R = 11 for one structure
    said = r"12 channels.*num_raters = 3 and num_structures = 2 need C \* \(R \+ 1\) = 8"
    with pytest.raises(ValueError, match=said):
        orcal.OrdinalLoss(num_raters=3, num_structures=2)(head, batch_k)
    with pytest.raises(ValueError, match=r"has 12 channels.*num_raters = 3 need R \+ 1 = 4"):
        orcal.OrdinalLoss(num_raters=3)(head, batch_k[:, :1])  # read as one structure with R = 11 before
    with pytest.raises(ValueError, match=r"5 channels.*num_raters = 3 need R \+ 1 = 4"):
        orcal.ordinal_loss(torch.randn(1, 5, 20, 16, 12), batch_k[:, :1], num_raters=3)  # a head for 4 raters
    with pytest.raises(ValueError, match="1 structure.*num_structures = 2"):
        orcal.ordinal_loss(torch.randn(1, 8, 20, 16, 12), batch_k[:, :1], num_raters=3, num_structures=2)
    good = torch.randn(1, 8, 20, 16, 12)
    torch.testing.assert_close(orcal.OrdinalLoss(num_raters=3, num_structures=2)(good, batch_k),
                               orcal.ordinal_loss(good, batch_k))
    masks = torch.as_tensor(stacked["masks"])[None]
    with pytest.raises(ValueError, match="holds 3 raters.*num_raters = 2"):
        orcal.OrdinalLoss(from_masks=True, num_structures=2, num_raters=2)(torch.randn(1, 6, 20, 16, 12), masks)

    with pytest.warns(DeprecationWarning, match="ORCTargetd: num_classes= is deprecated.*use num_structures="):
        old = ORCTargetd(num_classes=2, num_raters=3)
    assert torch.equal(torch.as_tensor(old(stacked)["k"]), torch.as_tensor(k))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="num_structures=1 and num_classes=2"):
        ORCTargetd(num_structures=1, num_classes=2)


def test_post_processed_logits_warn():
    """A segmentation tutorial's Activations(sigmoid) + AsDiscrete(0.5) left on the ordinal head: warned."""
    post = monai_transforms.Compose([monai_transforms.Activations(sigmoid=True),
                                     monai_transforms.AsDiscrete(threshold=0.5)])
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 6, 6, 5, generator=g) * 3
    k = torch.randint(0, 4, (2, 1, 6, 6, 5), generator=g)
    binary = torch.stack([post(x) for x in logits])
    probs = torch.sigmoid(logits)
    forms = [lambda p: MultiRaterCalibrationMetric(kind="ordinal", num_raters=3)(p, k),
             lambda p: MultiRaterCalibrationMetric(kind="ordinal", num_raters=3)(decollate_batch(p),
                                                                                 decollate_batch(k)),
             lambda p: MultiRaterCalibration(kind="ordinal", num_raters=3).update(p, k)]
    tm = pytest.importorskip("orcal.integrations.torchmetrics")
    forms.append(lambda p: tm.MultiRaterECE(kind="ordinal", num_raters=3).update(p, k))
    for form in forms:
        with pytest.warns(UserWarning, match=r"only 0 and 1.*AsDiscrete"):
            form(binary)
        with pytest.warns(UserWarning, match=r"probabilities.*Activations"):
            form(probs)
    with pytest.warns(UserWarning, match="binary logits.*kind='prob'"):
        MultiRaterCalibrationMetric(kind="logit", num_raters=3)(probs[:, :1], k)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raw logits: no warning
        MultiRaterCalibrationMetric(kind="ordinal", num_raters=3)(logits, k)
        MultiRaterCalibrationMetric(num_raters=3)(probs[:, :1], k)  # probabilities where they are expected


def _improving_epochs(n=6):
    """Validation data whose MR-ECE falls at every epoch: predictions drift from the inverted raters' share
    to the share itself."""
    g = torch.Generator().manual_seed(6)
    masks = (torch.rand(2, 3, 6, 6, 4, generator=g) < torch.rand(2, 1, 6, 6, 4, generator=g)).to(torch.uint8)
    share = masks.float().mean(1, keepdim=True)
    return [[(share * t / (n - 1) + (1 - share) * (1 - t / (n - 1)), masks)] for t in range(n)], n


def test_early_stopping_and_best_model_keep_the_lowest_mr_ece():
    """Lower is better: ignite's EarlyStopping with handler.score_function runs on while MR-ECE improves (a
    Dice-era stopping_fn_from_metric stops it), and MONAI's evaluator tracks the lowest value as best."""
    ignite_engine = pytest.importorskip("ignite.engine")
    from ignite.handlers import EarlyStopping
    from monai.handlers import stopping_fn_from_metric

    epochs, n = _improving_epochs()

    def run(score_fn_of):
        handler = MultiRaterCalibrationHandler(key="mr_ece")
        trainer = ignite_engine.Engine(lambda engine, batch: None)
        evaluator = ignite_engine.Engine(lambda engine, batch: batch)
        handler.attach(evaluator, "val_mr_ece")
        seen = []
        evaluator.add_event_handler(ignite_engine.Events.COMPLETED,
                                    lambda e: seen.append(e.state.metrics["val_mr_ece"]))
        evaluator.add_event_handler(ignite_engine.Events.COMPLETED,
                                    EarlyStopping(patience=2, score_function=score_fn_of(handler), trainer=trainer))
        trainer.add_event_handler(ignite_engine.Events.EPOCH_COMPLETED,
                                  lambda e: evaluator.run(epochs[e.state.epoch - 1]))
        trainer.run([0], max_epochs=n)
        return seen

    kept = run(lambda handler: handler.score_function)
    assert len(kept) == n and all(b < a for a, b in zip(kept, kept[1:]))  # improved every time, never stopped
    stopped = run(lambda handler: stopping_fn_from_metric("val_mr_ece"))  # the trap: read as higher-is-better
    assert len(stopped) == 3
    assert orcal_monai.score_function("val_auc", key="auc")(type("E", (), {"state": type("S", (), {
        "metrics": {"val_auc": 0.8}})})) == 0.8  # higher-is-better metrics keep their sign

    # MONAI's own engine: metric_cmp_fn makes state.best_metric the lowest MR-ECE
    from monai.engines import SupervisedEvaluator
    from monai.handlers import from_engine

    data = [{"image": p, "label": m} for (p, m), in epochs]
    handler = MultiRaterCalibrationHandler(key="mr_ece", output_transform=from_engine(["pred", "label"]))
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=[data[-1]],
                                    network=torch.nn.Identity(), key_val_metric={"val_mr_ece": handler},
                                    metric_cmp_fn=handler.metric_cmp_fn, decollate=False)
    best = []
    for item in (data[2], data[4], data[1]):
        evaluator.data_loader = [item]
        evaluator.run()
        best.append(evaluator.state.best_metric)
    assert best[1] < best[0] and best[2] == best[1]  # the worse last epoch is not "best"
    with pytest.raises(RuntimeError, match="attached to no engine"):
        MultiRaterCalibrationHandler().score_function(evaluator)


def test_torchmetrics_direction_attributes():
    tm = pytest.importorskip("orcal.integrations.torchmetrics")
    assert tm.MultiRaterECE.higher_is_better is False and tm.MultiRaterBrier.higher_is_better is False
    assert tm.MultiRaterAUROC.higher_is_better is True and tm.MultiRaterDice.higher_is_better is True


def test_crop_on_the_union_of_structures(tmp_path):
    """RandCropByPosNegLabeld reads a several-channel label as one-hot and drops channel 0: cropping on k
    (C, *S) never centres on structure 1; ORCTargetd's union_key (and StackRatersd's union) does."""
    cases = _structure_cases(str(tmp_path))
    base = [StackRatersd(RATERS, structures=[1, 2], union_key="stack_union"),
            ORCTargetd(num_structures=2, union_key="union")]

    def structure1_crops(label_key):
        crop = RandCropByPosNegLabeld(["image", "k"], label_key=label_key, spatial_size=(4, 4, 4), pos=1, neg=0,
                                      num_samples=24)
        transform = _load(cases, *base, crop)
        transform.set_random_state(1)
        return sum(int(s["k"][0].max() > 0) for s in transform(cases[0]))

    assert structure1_crops("k") == 0  # what cropping on the vote counts does
    assert structure1_crops("union") > 0
    assert structure1_crops("stack_union") > 0
    d = _load(cases, *base)(cases[0])
    assert torch.equal(d["union"], d["stack_union"]) and d["union"].dtype == torch.uint8
    with pytest.raises(ValueError, match="union_key"):
        ORCTargetd(union_key="k")


def test_resampled_float_counts_one_rule(tmp_path):
    """Spacingd/Orientationd after ORCTargetd make k float32: the loss and all three metric forms read exact
    integers as counts; an interpolating resampling is refused, naming the fix."""
    tm = pytest.importorskip("orcal.integrations.torchmetrics")
    cases = _write_cases(str(tmp_path), n=1)
    head = [StackRatersd(RATERS, label=2), ORCTargetd(num_raters=3)]
    nearest = _load(cases, *head, monai_transforms.Orientationd(["image", "k"], axcodes="RAS"),
                    monai_transforms.Spacingd(["image", "k"], pixdim=(1.0, 1.0, 1.5), mode=("bilinear", "nearest")))
    d = nearest(cases[0])
    k = d["k"][None]
    assert k.dtype == torch.float32  # what MONAI hands over
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 4, *k.shape[2:], generator=g)
    ki = k.as_tensor().to(torch.uint8)
    want = MultiRaterCalibration(kind="ordinal", num_raters=3)
    want.update(logits, ki)
    expected = want.compute()["mr_ece"]
    monai_metric = MultiRaterCalibrationMetric(kind="ordinal", num_raters=3)
    monai_metric(decollate_batch(logits), decollate_batch(k))
    streaming = MultiRaterCalibration(kind="ordinal", num_raters=3)
    streaming.update(logits, k)
    ece = tm.MultiRaterECE(kind="ordinal", num_raters=3)
    ece.update(logits, k)
    for got in (monai_metric.aggregate("mr_ece"), streaming.compute()["mr_ece"], float(ece.compute())):
        assert got == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(orcal.OrdinalLoss(num_raters=3)(logits, k), orcal.ordinal_loss(logits, ki))

    smooth = _load(cases, *head, monai_transforms.Spacingd(["image", "k"], pixdim=(1.0, 1.0, 1.5), mode="bilinear"))
    k_bad = smooth(cases[0])["k"][None]
    logits = torch.randn(1, 4, *k_bad.shape[2:], generator=g)
    for call in (lambda: orcal.OrdinalLoss()(logits, k_bad),
                 lambda: MultiRaterCalibrationMetric(kind="ordinal", num_raters=3)(logits, k_bad),
                 lambda: MultiRaterCalibration(kind="ordinal", num_raters=3).update(logits, k_bad),
                 lambda: tm.MultiRaterECE(kind="ordinal", num_raters=3).update(logits, k_bad)):
        with pytest.raises(TypeError, match=r"non-integer.*Spacingd\(keys, pixdim, mode=\('bilinear', 'nearest'\)\)"):
            call()


def test_num_raters_in_the_constructor_of_every_metric_form():
    tm = pytest.importorskip("orcal.integrations.torchmetrics")
    g = torch.Generator().manual_seed(8)
    logits, k = torch.randn(2, 4, 6, 6, 5, generator=g), torch.randint(0, 4, (2, 1, 6, 6, 5), generator=g)
    values = []
    for make, step, result in (
            (MultiRaterCalibration, lambda m, **kw: m.update(logits, k, **kw), lambda m: m.compute()["mr_ece"]),
            (tm.MultiRaterECE, lambda m, **kw: m.update(logits, k, **kw), lambda m: float(m.compute())),
            (MultiRaterCalibrationMetric, lambda m, **kw: m(logits, k), lambda m: m.aggregate("mr_ece"))):
        metric = make(kind="ordinal", num_raters=3)
        step(metric)
        values.append(result(metric))
        with pytest.raises(ValueError, match=r"holds vote counts k.*pass num_raters=R"):
            step(make(kind="ordinal"))  # forgot num_raters: say to pass it
    assert values[0] == pytest.approx(values[1], rel=1e-6) and values[0] == pytest.approx(values[2], rel=1e-9)
    repeated = MultiRaterCalibration(kind="ordinal", num_raters=3)
    repeated.update(logits, k, num_raters=3)  # older code passes it to update: the same number is fine
    with pytest.raises(ValueError, match=r"update\(num_raters=4\) contradicts num_raters=3"):
        repeated.update(logits, k, num_raters=4)
    with pytest.raises(ValueError, match=r"update\(num_raters=4\) contradicts num_raters=3"):
        tm.MultiRaterECE(kind="ordinal", num_raters=3).update(logits, k, num_raters=4)
    with pytest.raises(ValueError, match="pass num_raters"):  # probabilities against k (B, 1, *S)
        MultiRaterCalibrationMetric()(torch.rand(2, 1, 6, 6, 5), k)


def test_readout_transform_for_viewing(tmp_path):
    g = torch.Generator().manual_seed(9)
    cases = _write_cases(str(tmp_path), n=1)
    image = _load(cases)(cases[0])["image"]
    logits = MetaTensor(torch.randn(4, *image.shape[1:], generator=g), meta=image.meta)
    d = orcal_monai.ORCReadoutd("pred", readout="expected", name="prob")({"pred": logits})
    prob = d["prob"]
    assert isinstance(prob, MetaTensor) and prob.shape == (1, *image.shape[1:])
    torch.testing.assert_close(torch.as_tensor(prob.affine), torch.as_tensor(image.affine))
    torch.testing.assert_close(prob.as_tensor(), orcal.foreground_probability(logits.as_tensor()[None], "expected"))
    ek = orcal_monai.ORCReadoutd("pred", readout="expected_k")({"pred": logits})["pred"]
    torch.testing.assert_close(ek.as_tensor(), 3 * prob.as_tensor())
    maj = orcal_monai.ORCReadoutd("pred", readout="majority", name="p")({"pred": logits})["p"]
    torch.testing.assert_close(maj.as_tensor(), orcal.foreground_probability(logits.as_tensor()[None]))
    two = torch.randn(8, 5, 5, 4, generator=g)
    both = orcal_monai.ORCReadoutd("pred", num_structures=2)({"pred": two})["pred"]
    torch.testing.assert_close(both, orcal.foreground_probability(two[None], "expected", num_structures=2)[0])
    with pytest.raises(ValueError, match="decollate"):
        orcal_monai.ORCReadoutd("pred")({"pred": torch.randn(4, 5)})
    with pytest.raises(ValueError, match="readout"):
        orcal_monai.ORCReadoutd("pred", readout="mean")
