"""What a network's head is: its kind, how many channels it has, which readouts it gives, and how the rows of
an experiment's tables are named after them. One place for each, so that training, prediction, the experiment
and its report agree.

- ``Head("ordinal", R)``: ``R + 1`` logits per structure (one per consensus level 0..R), read out as
  ``"majority"`` (P(k >= m), the paper's), ``"expected"`` (E[k] / R) or, where ``R`` is even or unknown,
  ``"half_tie"`` (P(k > R/2) + P(k = R/2) / 2), SPEC §2; prediction also writes ``"expected_k"`` (E[k], a
  count rather than a probability).
- ``Head("binary")``: one logit per structure, read out as its ``"sigmoid"``.

Row keys: a head with one readout names its row after the method (``"soft"``); a head with several after the
method and the readout (``"ordinal/expected"``); a temperature-scaled readout adds ``"+ts"``
(``"soft+ts"``, ``"ordinal/expected+ts"``). :meth:`Head.row` writes them and :func:`parse_row` reads them.

>>> Head("ordinal", num_raters=3).channels, Head("ordinal", num_raters=3).readouts, Head("binary").readouts
(4, ('majority', 'expected'), ('sigmoid',))
>>> Head("ordinal", num_raters=4).readouts
('majority', 'expected', 'half_tie')
>>> Head("ordinal").row("ordinal", scaled("expected")), parse_row("ordinal/expected+ts")
('ordinal/expected+ts', Row(method='ordinal', readout='expected', scaled=True))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

#: The kinds of head: ``R + 1`` ordinal levels or one binary logit per structure.
KINDS = ("ordinal", "binary")
#: The readouts of an ordinal head (SPEC §2), the paper's first. The half-tie readout counts a tie of R/2 votes
#: half; it differs from the majority readout only for even R.
ORDINAL_READOUTS = ("majority", "expected", "half_tie")
HALF_TIE = "half_tie"
#: The one readout of a binary head. Records written before it had its own name called it "majority".
SIGMOID = "sigmoid"
#: The expected vote count E[k] of an ordinal head: written by prediction beside the readouts, not a probability.
EXPECTED_K = "expected_k"
#: Suffix of a temperature-scaled readout and of its table row (``"soft+ts"``, ``"ordinal/expected+ts"``).
TS_SUFFIX = "+ts"


class Row(NamedTuple):
    """A table row key, read back: the method, its readout (None for a head with one readout), scaled or not."""

    method: str
    readout: str | None
    scaled: bool


def scaled(readout: str) -> str:
    """The name of ``readout`` after temperature scaling."""
    return readout + TS_SUFFIX


def unscaled(key: str) -> tuple[str, bool]:
    """``(readout or row without the temperature-scaling suffix, whether it had it)``."""
    base = key.removesuffix(TS_SUFFIX)
    return base, base != key


def parse_row(row: str) -> Row:
    """Read a row key written by :meth:`Head.row`."""
    base, is_scaled = unscaled(row)
    method, _, readout = base.partition("/")
    return Row(method, readout or None, is_scaled)


@dataclass(frozen=True)
class Head:
    """A network's head: ``kind`` (``"ordinal"`` or ``"binary"``), ``num_raters`` ``R`` (needed for an
    ordinal head's channels) and ``num_structures`` ``C`` (SPEC §11)."""

    kind: str
    num_raters: int | None = None
    num_structures: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"head must be one of {KINDS}, got {self.kind!r}")
        C = self.num_structures
        if isinstance(C, bool) or not isinstance(C, int) or C < 1:
            raise ValueError(f"num_structures must be a positive int, got {C!r}")
        R = self.num_raters
        if R is not None and (isinstance(R, bool) or not isinstance(R, int) or not 1 <= R <= 255):
            raise ValueError(f"num_raters must be an int in 1..255, got {R!r}")

    @property
    def readouts(self) -> tuple[str, ...]:
        """The foreground probabilities this head gives: those of SPEC §2 for an ordinal head (the half-tie
        readout only where ``R`` is even or unknown: for odd ``R`` it is the majority readout), its sigmoid else."""
        if self.kind != "ordinal":
            return (SIGMOID,)
        odd = self.num_raters is not None and self.num_raters % 2 == 1
        return tuple(r for r in ORDINAL_READOUTS if not (odd and r == HALF_TIE))

    def op_majority(self, readout: str, majority: int | None) -> int | None:
        """The ``majority`` argument of the ops for ``readout``: the half-tie readout has its own thresholds."""
        return None if unscaled(readout)[0] == HALF_TIE else majority

    @property
    def maps(self) -> tuple[str, ...]:
        """What prediction writes per case: the readouts, and ``E[k]`` for an ordinal head."""
        return (*self.readouts, EXPECTED_K) if self.kind == "ordinal" else self.readouts

    @property
    def channels(self) -> int:
        """Output channels: ``R + 1`` per structure for an ordinal head, one per structure for a binary one
        (structure-major, SPEC §11)."""
        if self.kind == "binary":
            return self.num_structures
        if self.num_raters is None:
            raise ValueError("head='ordinal' needs num_raters in 1..255 for its channels, got None")
        return self.num_structures * (self.num_raters + 1)

    @property
    def metric_kind(self) -> str:
        """The ``kind`` the statistics ops and temperature scaling take for this head's logits."""
        return "ordinal" if self.kind == "ordinal" else "logit"

    def readout(self, name: str) -> str:
        """``name`` checked against :attr:`readouts` (a temperature-scaled one keeps its suffix); a binary
        head's readout read from an older record or command line (``"majority"``) becomes ``"sigmoid"``."""
        base, is_scaled = unscaled(name)
        if self.kind == "binary" and base == "majority":
            base = SIGMOID
        if base not in self.readouts:
            raise ValueError(f"readout must be one of {self.readouts} for a {self.kind} head, got {name!r}")
        return scaled(base) if is_scaled else base

    def op_readout(self, readout: str) -> str:
        """The ``readout`` argument of the ops (SPEC §2) for one of this head's readouts; a binary head's logit
        is not an ordinal one, and the ops ignore the readout for it."""
        base = unscaled(self.readout(readout))[0]
        return base if self.kind == "ordinal" else ORDINAL_READOUTS[0]

    def row(self, method: str, readout: str) -> str:
        """The table row of ``method``'s ``readout``: the method alone for a head with one readout, else
        ``method/readout``; a temperature-scaled readout keeps its suffix."""
        base, is_scaled = unscaled(self.readout(readout))
        row = f"{method}/{base}" if len(self.readouts) > 1 else method
        return scaled(row) if is_scaled else row
