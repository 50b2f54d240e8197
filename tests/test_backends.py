"""The backend table (orcal.ops.backends): a backend added by the documented recipe (docs/design.md, "a backend")
serves every op, one structure or several, through ``backend=`` and ``ORCAL_BACKEND``, and leaves with
``unregister_backend``. The backend here is the reference itself, registered as custom ops in its own namespace."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import orcal
from orcal import ops
from orcal.ops import _schema, reference

NAMESPACE = "orcal_test_reference"
CALLS: Counter = Counter()
_REDUCTION_NAMES = {code: name for name, code in _schema.REDUCTIONS.items()}


# --- step 1 of the recipe: the four ops of the schema in a namespace ------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::orc_targets", mutates_args=())
def _orc_targets(masks: torch.Tensor) -> torch.Tensor:
    CALLS["orc_targets"] += 1
    return reference.orc_targets(masks)


@torch.library.custom_op(f"{NAMESPACE}::foreground_probability", mutates_args=())
def _foreground_probability(logits: torch.Tensor, readout: str, majority: int) -> torch.Tensor:
    CALLS["foreground_probability"] += 1
    return reference.foreground_probability(logits, readout, majority).to(logits.dtype)


@torch.library.custom_op(f"{NAMESPACE}::ordinal_loss", mutates_args=())
def _ordinal_loss(logits: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None, rps_weight: float,
                  majority: int, reduction: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS["ordinal_loss"] += 1
    name = _REDUCTION_NAMES[reduction]
    loss = reference.ordinal_loss(logits, k, rps_weight, majority, valid, name)
    if not need_grad:
        return loss, logits.new_empty([0])
    return loss, reference.ordinal_loss_grad(logits, k, rps_weight, majority, valid, name).to(logits.dtype)


@torch.library.custom_op(f"{NAMESPACE}::calibration_stats", mutates_args=())
def _calibration_stats(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, num_raters: int,
                       target_is_masks: bool, kind: str, readout: str, majority: int, n_bins: int,
                       auc_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS["calibration_stats"] += 1
    k = reference.orc_targets(target) if target_is_masks else target
    p = reference.binary_probability(pred, kind, readout, majority)
    return reference.calibration_stats(p, k, num_raters, n_bins, auc_bins, majority, valid).pack()


# --- step 2: their shapes and the fused loss's autograd -------------------------------------------------------
_schema.register(NAMESPACE, "refcopy")


# --- step 3: one entry in the table (in the fixture, so that the test leaves the table as it found it) -------

@pytest.fixture
def refcopy():
    ops.register_backend("refcopy", NAMESPACE, device_types=("cpu",))
    CALLS.clear()
    yield "refcopy"
    ops.unregister_backend("refcopy")


def _case(B=2, R=3, S=(5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(B, R, *S, generator=g) < 0.5).to(torch.uint8)
    logits = torch.randn(B, R + 1, *S, generator=g)
    return masks, logits


def test_a_registered_backend_is_a_backend_name_until_unregistered(refcopy):
    assert refcopy in ops.BACKENDS and refcopy in repr(ops.BACKENDS)
    ops.unregister_backend(refcopy)
    try:
        assert refcopy not in ops.BACKENDS
        with pytest.raises(ValueError, match="backend must be one of"):
            orcal.orc_targets(_case()[0], backend=refcopy)
    finally:
        ops.register_backend(refcopy, NAMESPACE, device_types=("cpu",))


def test_every_op_runs_on_the_new_backend_and_matches_the_reference(refcopy):
    masks, logits = _case()
    k = orcal.orc_targets(masks, backend=refcopy)
    assert torch.equal(k, orcal.orc_targets(masks, backend="torch"))
    for readout in ("majority", "expected"):
        p = orcal.foreground_probability(logits, readout, backend=refcopy)
        torch.testing.assert_close(p, orcal.foreground_probability(logits, readout, backend="torch"))
    grads = {}
    for be in (refcopy, "torch"):
        z = logits.clone().requires_grad_()
        loss = orcal.ordinal_loss(z, k, valid=masks[:, 0].bool(), backend=be)
        (2 * loss).backward()
        grads[be] = (loss.detach(), z.grad)
    torch.testing.assert_close(grads[refcopy], grads["torch"])
    for kind, pred in (("ordinal", logits), ("prob", torch.rand(2, 5, 6))):
        new = orcal.calibration_stats(pred, masks, kind=kind, backend=refcopy)
        old = orcal.calibration_stats(pred, masks, kind=kind, backend="torch")
        assert torch.equal(new.n, old.n) and torch.equal(new.pos, old.pos)
        torch.testing.assert_close(new.s, old.s)
    assert set(CALLS) == {"orc_targets", "foreground_probability", "ordinal_loss", "calibration_stats"}


def test_several_structures_run_on_the_new_backend(refcopy):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2, 3, 5, 6), generator=g)  # C = 2 structures, R = 3 raters
    logits = torch.randn(2, 2 * 4, 5, 6, generator=g)
    k = orcal.orc_targets(labels, backend=refcopy, num_structures=2)
    assert torch.equal(k, orcal.orc_targets(labels, backend="torch", num_structures=2))
    torch.testing.assert_close(orcal.ordinal_loss(logits, k, backend=refcopy),
                               orcal.ordinal_loss(logits, k, backend="torch"))
    new = orcal.calibration_stats(logits, k, num_raters=3, kind="ordinal", backend=refcopy)
    old = orcal.calibration_stats(logits, k, num_raters=3, kind="ordinal", backend="torch")
    assert new.num_structures == old.num_structures == 2 and torch.equal(new.n, old.n)
    assert CALLS["ordinal_loss"] and CALLS["calibration_stats"] and CALLS["orc_targets"]


def test_orcal_backend_names_the_new_backend(refcopy, monkeypatch):
    monkeypatch.setenv("ORCAL_BACKEND", refcopy)
    assert ops.resolve_backend("ordinal_loss", "auto", torch.device("cpu")) == refcopy
    orcal.orc_targets(_case()[0])
    assert CALLS["orc_targets"] == 1


def test_auto_tries_the_table_in_order_and_a_backend_asked_for_says_why_it_cannot_run():
    ops.register_backend("switched_off", NAMESPACE, unavailable=lambda op, device: "it is switched off here")
    try:
        expected = "cpp" if ops._ext.compiled() else "torch"  # the compiled kernels come first in the table
        assert ops.resolve_backend("orc_targets", "auto", torch.device("cpu")) == expected
        with pytest.raises(RuntimeError, match="backend='switched_off' asked for orcal::orc_targets on cpu, but it "
                                               "is switched off here"):
            orcal.orc_targets(_case()[0], backend="switched_off")
    finally:
        ops.unregister_backend("switched_off")


@pytest.mark.parametrize("name", ["auto", "torch", "cpp", "not a name", 3])
def test_a_backend_name_is_new_and_an_identifier(name):
    with pytest.raises(ValueError, match="backend name|already registered"):
        ops.register_backend(name, NAMESPACE)


def test_unregistering_an_unknown_backend_names_the_registered_ones():
    with pytest.raises(KeyError, match="triton"):
        ops.unregister_backend("nope")
