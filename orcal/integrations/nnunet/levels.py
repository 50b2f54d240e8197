"""The joint vote counts of several structures as nnU-Net classes (SPEC §11): each class a tuple
``(k_1, ..., k_C)`` with ``sum k_c <= R``, the matrix that sums their probabilities into each structure's
marginal levels, and the loss on those marginals."""

from __future__ import annotations

import itertools

import numpy as np
import torch


def joint_levels(num_structures: int, num_raters: int) -> torch.Tensor:
    """Every joint vote count ``(k_1, ..., k_C)`` with ``sum k_c <= R`` (each rater gives a voxel one label), in
    lexicographic order from the all-zero background: ``(N, C)`` uint8, row ``i`` the nnU-Net class ``i``."""
    rows = [t for t in itertools.product(range(num_raters + 1), repeat=num_structures) if sum(t) <= num_raters]
    return torch.tensor(rows, dtype=torch.uint8)


def joint_index(k: np.ndarray, num_raters: int) -> np.ndarray:
    """The nnU-Net class of each voxel's joint vote count: ``k (C, *S)`` -> ``(*S)`` (int16)."""
    C = k.shape[0]
    levels = joint_levels(C, num_raters).numpy().astype(np.int64)
    radix = (num_raters + 1) ** np.arange(C - 1, -1, -1)
    lut = np.full((num_raters + 1) ** C, -1, dtype=np.int16)
    lut[levels @ radix] = np.arange(len(levels))
    return lut[np.tensordot(radix, k.astype(np.int64), axes=1)]


def marginal_matrix(num_structures: int, num_raters: int) -> torch.Tensor:
    """``(C (R+1), N)`` 0/1: row ``c (R+1) + j`` sums the joint classes whose structure ``c`` has ``k_c = j``."""
    levels = joint_levels(num_structures, num_raters).long()
    M = torch.zeros(num_structures * (num_raters + 1), len(levels))
    for c in range(num_structures):
        M[c * (num_raters + 1) + levels[:, c], torch.arange(len(levels))] = 1
    return M


def marginal_logits(logits: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Joint-class logits ``(B, N, *S)`` as the log-probabilities of each structure's levels,
    ``(B, C (R+1), *S)``: logits whose softmax per structure is that structure's marginal distribution."""
    q = torch.softmax(logits.float(), 1)
    marginal = torch.einsum("mn,bn...->bm...", M.to(q), q)
    return torch.log(marginal.clamp_min(1e-30))


class JointOrdinalLoss(torch.nn.Module):
    """orcal's ordinal loss (SPEC §3, §11) of every structure on the marginals of a joint-class head:
    ``loss(logits (B, N, *S), target (B, 1, *S) joint class)``, nnU-Net's ``ignore_index`` voxels left out."""

    def __init__(self, num_structures: int, num_raters: int, rps_weight: float = 1.0, majority: int | None = None,
                 ignore_index: int | None = None) -> None:
        super().__init__()
        self.rps_weight, self.majority, self.ignore_index = rps_weight, majority, ignore_index
        self.register_buffer("levels", joint_levels(num_structures, num_raters), persistent=False)
        self.register_buffer("M", marginal_matrix(num_structures, num_raters), persistent=False)

    def votes(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(k (B, C, *S), valid (B, *S) or None)`` of a joint-class target ``(B, 1, *S)``."""
        t = target[:, 0].long()
        valid = None
        if self.ignore_index is not None:
            valid = t != self.ignore_index
            t = torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))
        return self.levels.to(t.device)[t].movedim(-1, 1), valid

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from orcal.ops import ordinal_loss

        k, valid = self.votes(target)
        return ordinal_loss(marginal_logits(logits, self.M), k, self.rps_weight, self.majority, valid=valid)
