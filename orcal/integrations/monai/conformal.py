"""A MONAI dictionary transform that applies a fitted conformal calibrator (SPEC §12) to one image's map.

:class:`ConformalMaskd` turns a probability map (or logits, or an ordinal head's logits through a readout) into
the conformal mask of a fitted :class:`~orcal.metrics.ConformalRiskControl` (the voxels ``p >= lambda``) or
:class:`~orcal.metrics.ConformalVoxelSets` (the voxels whose set holds foreground, plus the **uncertain** voxels
whose set holds both labels), as channel-first uint8 MetaTensors with the input's metadata, ready for
``SaveImaged``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch

try:
    from monai.config import KeysCollection
    from monai.data import MetaTensor
    from monai.transforms import MapTransform
    from monai.utils import TransformBackends
except ImportError as err:  # an optional extra: say how to get it
    raise ImportError('orcal.integrations.monai needs MONAI: pip install "orcal[monai]"') from err

from orcal import ops
from orcal.integrations.monai.transforms import ORCReadoutd, _as_tensor
from orcal.metrics.conformal import ConformalRiskControl
from orcal.metrics.conformal_sets import VoxelSets, masks_from_probabilities

__all__ = ["ConformalMaskd"]


class ConformalMaskd(MapTransform):
    """One image's map → its conformal mask (and uncertainty mask), channel-first, metadata kept.

    Args:
        keys: keys of one image's map: probabilities ``(1, *S)`` (``(C, *S)`` for a calibrator of ``C``
            structures), logits of the same shape (``kind="logit"``), or ordinal logits ``(C * (R+1), *S)``
            (``kind="ordinal"``, read out by ``readout`` as :class:`ORCReadoutd` does).
        calibrator: a fitted :class:`~orcal.metrics.ConformalRiskControl` or
            :class:`~orcal.metrics.ConformalVoxelSets` (e.g. from :func:`~orcal.metrics.load_conformal`); its
            probabilities must be read the way it was calibrated (same ``kind`` and ``readout``).
        kind: ``"prob"``, ``"logit"`` (a sigmoid first) or ``"ordinal"``.
        readout, majority: the readout of ordinal logits (``"majority"`` or ``"expected"``).
        mask_suffix: the mask goes to ``f"{key}{mask_suffix}"``: ``p >= lambda`` for risk control, the voxels
            whose set holds foreground for voxel sets.
        uncertain_suffix: voxel sets only, the voxels whose set is ``{0, 1}`` go to ``f"{key}{uncertain_suffix}"``.
        lower_suffix: voxel sets only, if given, the voxels whose set is ``{1}`` (surely foreground).
        allow_missing_keys: skip absent keys.
    """

    backend = [TransformBackends.TORCH]
    KINDS = ("prob", "logit", "ordinal")

    def __init__(self, keys: KeysCollection = "pred", calibrator: ConformalRiskControl | None = None,
                 kind: str = "prob", readout: str = "expected", majority: int | None = None,
                 mask_suffix: str = "_mask", uncertain_suffix: str = "_uncertain", lower_suffix: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not masks_from_probabilities(calibrator):
            raise TypeError("ConformalMaskd: calibrator must be a fitted ConformalRiskControl or ConformalVoxelSets, "
                            f"got {type(calibrator).__name__}")
        if calibrator.thresholds is None:
            raise ValueError("ConformalMaskd: the calibrator is not fitted; call fit(alpha) or load_conformal first")
        ops.check_choice("kind", kind, self.KINDS)
        self.calibrator, self.kind = calibrator, kind
        self.reader = ORCReadoutd("pred", readout, majority=majority, num_structures=calibrator.num_structures) \
            if kind == "ordinal" else None
        self.suffixes = {"mask": mask_suffix, "uncertain": uncertain_suffix, "lower": lower_suffix}

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """One image's map → its foreground probability ``(C, *S)`` (``C = 1`` for a binary calibrator)."""
        if self.reader is not None:
            return ops.plain_tensor(self.reader.readout_map(x))
        x = ops.plain_tensor(x)
        return torch.sigmoid(x.float()) if self.kind == "logit" else x

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        C = self.calibrator.num_structures
        for key in self.key_iterator(d):
            x = _as_tensor(d[key], f"ConformalMaskd: data[{key!r}]")
            if x.ndim < 2:
                raise ValueError(f"ConformalMaskd: data[{key!r}] must be one channel-first image (C, *S), got shape "
                                 f"{tuple(x.shape)}; decollate a batch first (decollate_batch)")
            p = self.probability(x)
            want = 1 if C is None else C
            if p.shape[0] != want:
                raise ValueError(f"ConformalMaskd: data[{key!r}] gives {p.shape[0]} channel(s), the calibrator "
                                 f"has {want} structure(s)")
            with torch.no_grad():
                out = self.calibrator.predict(p if C is None else p[None])
            maps = {"mask": out.upper, "uncertain": out.uncertain, "lower": out.lower} \
                if isinstance(out, VoxelSets) else {"mask": out}
            for what, m in maps.items():
                suffix = self.suffixes[what]
                if suffix is None:
                    continue
                m = (m if C is None else m[0]).to(torch.uint8)
                if isinstance(x, MetaTensor):
                    m = MetaTensor(m, meta=x.meta, applied_operations=x.applied_operations)
                d[f"{key}{suffix}"] = m
        return d
