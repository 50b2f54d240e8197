"""Per-image calibration statistics (SPEC §4): the one currency of every metric in orcal.

A :class:`CalibrationStats` holds one row per image (per image and structure for several structures,
SPEC §11). Summing rows (or an all-reduce across processes) is exact for the integer counts, so dataset
totals, per-image values and the bootstrap all come from the same single pass over the voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from orcal.ops._schema import StatsLayout

#: Fields that are integer counts (int64, exact under summation).
COUNT_FIELDS = ("n", "a", "tp", "fp", "fn", "pos", "neg")
#: Fields that are float sums (float64).
SUM_FIELDS = ("s", "brier", "nll")


@dataclass
class CalibrationStats:
    """Per-image sufficient statistics of the multi-rater calibration metrics.

    Shapes, with ``B`` images, ``n_bins`` ECE bins and ``auc_bins`` score bins:

    - ``n`` (B, n_bins) int64: voxel–rater pairs per ECE bin (``R`` per voxel);
    - ``a`` (B, n_bins) int64: positive pairs per bin (``k`` per voxel);
    - ``s`` (B, n_bins) float64: confidence mass per bin (``R * p`` per voxel);
    - ``brier`` (B,) float64: ``sum k (1-p)^2 + (R-k) p^2``;
    - ``nll`` (B,) float64: ``-sum k log p + (R-k) log(1-p)``, each log bounded below by log(1e-7);
    - ``tp``, ``fp``, ``fn`` (B,) int64: voxel counts at threshold ``p >= 0.5`` against the majority label;
    - ``pos``, ``neg`` (B, auc_bins) int64: positive / negative pairs per score bin (streaming AUC).

    With ``num_structures = C > 1`` (SPEC §11) there are ``B * C`` rows, image-major: row ``b * C + c`` is
    structure ``c + 1`` of image ``b``. Indexing, :meth:`cat` and :attr:`n_images` then count images.
    """

    n: torch.Tensor
    a: torch.Tensor
    s: torch.Tensor
    brier: torch.Tensor
    nll: torch.Tensor
    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    num_structures: int = 1

    def __post_init__(self) -> None:
        if self.num_structures < 1 or self.n.shape[0] % self.num_structures:
            raise ValueError(f"{self.n.shape[0]} rows do not hold num_structures = {self.num_structures} rows "
                             "per image")

    @property
    def n_images(self) -> int:
        """Number of images (rows divided by the number of structures)."""
        return self.n.shape[0] // self.num_structures

    @property
    def n_bins(self) -> int:
        return self.n.shape[1]

    @property
    def auc_bins(self) -> int:
        return self.pos.shape[1]

    @classmethod
    def empty(cls, n_bins: int, auc_bins: int, rows: int = 0, device: torch.device | str = "cpu",
              num_structures: int = 1) -> CalibrationStats:
        """Zero statistics with ``rows`` rows (``num_structures`` per image)."""
        i64 = dict(dtype=torch.int64, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            num_structures=num_structures,
            n=torch.zeros(rows, n_bins, **i64), a=torch.zeros(rows, n_bins, **i64),
            s=torch.zeros(rows, n_bins, **f64), brier=torch.zeros(rows, **f64), nll=torch.zeros(rows, **f64),
            tp=torch.zeros(rows, **i64), fp=torch.zeros(rows, **i64), fn=torch.zeros(rows, **i64),
            pos=torch.zeros(rows, auc_bins, **i64), neg=torch.zeros(rows, auc_bins, **i64),
        )

    def _map(self, fn, num_structures: int | None = None) -> CalibrationStats:
        return CalibrationStats(**{name: fn(getattr(self, name)) for name in TENSOR_FIELDS},
                                num_structures=self.num_structures if num_structures is None else num_structures)

    def _by_image(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.n_images, self.num_structures, *t.shape[1:])

    def total(self) -> CalibrationStats:
        """All rows summed into one (keeps a leading dimension of 1); with several structures, one row per
        structure summed over the images (use :meth:`pooled` to pool the structures too)."""
        return self._map(lambda t: self._by_image(t).sum(0))

    def pooled(self) -> CalibrationStats:
        """Every row summed into one, structures pooled: a single-structure total."""
        return self._map(lambda t: t.sum(0, keepdim=True), num_structures=1)

    def structure(self, index: int) -> CalibrationStats:
        """The rows of structure ``index`` (0-based: label ``index + 1``) as single-structure statistics."""
        if not 0 <= index < self.num_structures:
            raise IndexError(f"structure index {index} outside 0..{self.num_structures - 1}")
        return self._map(lambda t: t[index::self.num_structures], num_structures=1)

    def __getitem__(self, index) -> CalibrationStats:
        """Select images (an int, a slice, an index tensor); the row dimension is kept."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        if self.num_structures == 1:
            return self._map(lambda t: t[index])
        return self._map(lambda t: self._by_image(t)[index].flatten(0, 1))

    def to(self, device: torch.device | str) -> CalibrationStats:
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(parts: list[CalibrationStats]) -> CalibrationStats:
        """Concatenate the rows of several statistics (same bin counts)."""
        if not parts:
            raise ValueError("CalibrationStats.cat needs at least one part")
        shapes = {(p.n_bins, p.auc_bins, p.num_structures) for p in parts}
        if len(shapes) != 1:
            raise ValueError("cannot concatenate statistics with different (n_bins, auc_bins, num_structures): "
                             f"{sorted(shapes)}")
        return CalibrationStats(**{name: torch.cat([getattr(p, name) for p in parts]) for name in TENSOR_FIELDS},
                                num_structures=parts[0].num_structures)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The fields as a plain dict of tensors (for saving with ``torch.save``)."""
        out = {name: getattr(self, name) for name in TENSOR_FIELDS}
        if self.num_structures > 1:
            out["num_structures"] = torch.tensor(self.num_structures)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> CalibrationStats:
        missing = [name for name in TENSOR_FIELDS if name not in d]
        if missing:
            raise ValueError(f"statistics dict lacks fields {missing}")
        return cls(**{name: d[name] for name in TENSOR_FIELDS}, num_structures=int(d.get("num_structures", 1)))

    # Packed form used by the compiled kernels: one int64 and one float64 tensor per call.
    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed ``(counts, sums)`` of the kernels, columns as :class:`orcal.ops._schema.StatsLayout` says."""
        lay = StatsLayout(self.n_bins, self.auc_bins)
        rows = self.n.shape[0]
        counts = self.n.new_zeros(rows, lay.count_cols())
        sums = self.s.new_zeros(rows, lay.sum_cols())
        counts[:, lay.n():lay.a()], counts[:, lay.a():lay.tp()] = self.n, self.a
        counts[:, lay.tp()], counts[:, lay.fp()], counts[:, lay.fn()] = self.tp, self.fp, self.fn
        counts[:, lay.pos():lay.neg()], counts[:, lay.neg():] = self.pos, self.neg
        sums[:, lay.s():lay.brier()], sums[:, lay.brier()], sums[:, lay.nll()] = self.s, self.brier, self.nll
        return counts, sums

    @classmethod
    def unpack(cls, counts: torch.Tensor, sums: torch.Tensor, n_bins: int, auc_bins: int,
               num_structures: int = 1) -> CalibrationStats:
        """Inverse of :meth:`pack` (the columns of :class:`orcal.ops._schema.StatsLayout`)."""
        lay = StatsLayout(n_bins, auc_bins)
        return cls(num_structures=num_structures,
            n=counts[:, lay.n():lay.a()], a=counts[:, lay.a():lay.tp()],
            tp=counts[:, lay.tp()], fp=counts[:, lay.fp()], fn=counts[:, lay.fn()],
            pos=counts[:, lay.pos():lay.neg()], neg=counts[:, lay.neg():lay.count_cols()],
            s=sums[:, lay.s():lay.brier()], brier=sums[:, lay.brier()], nll=sums[:, lay.nll()],
        )


#: The tensor fields, in the order of the dataclass (everything but ``num_structures``).
TENSOR_FIELDS = tuple(f.name for f in fields(CalibrationStats) if f.name != "num_structures")
