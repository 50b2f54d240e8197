"""QUBIQ: quantification of uncertainties in biomedical image quantification (several tasks)."""

from __future__ import annotations

import re
from collections.abc import Callable

from ._io import read_array
from .base import (
    Case,
    MultiRaterDataset,
    binary_mask,
    channels_first,
    check_root,
    check_same_shape,
    make_item,
    natural_key,
    official_split,
    scale_intensity,
    seeded_split,
)

#: dataset folder -> number of sub-tasks (QUBIQ 2020 and 2021)
SUBTASKS = {"brain-growth": 1, "brain-tumor": 3, "kidney": 1, "prostate": 2, "pancreas": 1,
            "pancreatic-lesion": 1}


def parse_task(task: str | None) -> tuple[str, int]:
    """``"prostate:2"`` -> ("prostate", 2); a bare ``"brain-growth"`` means sub-task 1."""
    valid = [f"{name}:{t}" for name, n in SUBTASKS.items() for t in range(1, n + 1)]
    if task is None:
        raise ValueError(f"dataset 'qubiq' needs a task (argument 'task'), 'name:subtask'; valid tasks: "
                         f"{', '.join(valid)} (a bare name means sub-task 1)")
    name, _, sub = str(task).partition(":")
    if name not in SUBTASKS or (sub and (not sub.isdigit() or not 1 <= int(sub) <= SUBTASKS[name])):
        raise ValueError(f"unknown task {task!r} for dataset 'qubiq'; valid tasks: {', '.join(valid)} "
                         "(a bare name means sub-task 1)")
    return name, int(sub or 1)


class QUBIQ(MultiRaterDataset):
    """QUBIQ challenge data (MICCAI 2020/2021), 2D or 3D, a varying number of raters per task.

    Layout::

        ROOT/<dataset>/Training/caseNN/image.nii.gz
        ROOT/<dataset>/Training/caseNN/task0T_seg0R.nii.gz     rater R's mask for sub-task T (0/1)
        ROOT/<dataset>/Validation/caseNN/...                   used as the test split when present

    ``task`` is ``"<dataset>:<sub-task>"``, e.g. ``"prostate:2"`` or ``"brain-tumor:3"``; a bare dataset
    name (``"brain-growth"``) means sub-task 1. Datasets: brain-growth (1 sub-task), brain-tumor (3),
    kidney (1), prostate (2), pancreas (1), pancreatic-lesion (1). The number of raters is read from the
    files (the most any case has; a case with fewer is an error naming the missing file).
    Published: https://qubiq.grand-challenge.org (registration required).
    ``split``: Training gives train and a seeded val (``val_fraction``, ``seed``); Validation is test.
    Without a Validation folder, test is also carved from Training (``test_fraction``).
    Multi-channel images (brain-tumor) become (C, *S); intensities are scaled by 0.5/99.5 percentiles.
    """

    name = "qubiq"
    published = "https://qubiq.grand-challenge.org (QUBIQ challenge, registration required)"
    layout = "<dataset>/Training/caseNN/image.nii.gz with task0T_seg0R.nii.gz (and <dataset>/Validation/)"

    def __init__(self, root, split: str | None = None, task: str | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, seed: int = 0, transform: Callable | None = None):
        self.dataset, self.subtask = parse_task(task)
        root = check_root(root, self.name, self.published, self.layout)
        base = root / self.dataset
        if not (base / "Training").is_dir():
            raise FileNotFoundError(f"expected {base / 'Training'} for task {task!r}; layout: {self.layout}")
        pattern = re.compile(rf"task0*{self.subtask}_seg0*(\d+)\.nii(\.gz)?$")
        cases, self.raters = [], []
        for folder, official in (("Training", "train"), ("Validation", "test")):
            for d in sorted((base / folder).glob("case*"), key=lambda p: natural_key(p.name)):
                found = [int(m.group(1)) for p in d.iterdir() if (m := pattern.match(p.name))]
                self.raters = sorted(set(self.raters) | set(found))
                cases.append(Case(f"{folder}/{d.name}", f"{folder}/{d.name}", (d, official)))
        if not self.raters:
            raise FileNotFoundError(f"no task0{self.subtask}_seg0R.nii.gz files under {base}; "
                                    f"layout: {self.layout}")
        if (base / "Validation").is_dir():
            cases = official_split(cases, split, lambda c: c.info[1], val_fraction, seed)
        else:
            cases = seeded_split(cases, split, val_fraction, test_fraction, seed)
        super().__init__(cases, split, transform)

    def load_case(self, case: Case) -> dict:
        folder = case.info[0]
        masks = []
        for r in self.raters:
            path = folder / f"task{self.subtask:02d}_seg{r:02d}.nii.gz"
            if not path.is_file():
                alt = sorted(folder.glob(f"task*{self.subtask}_seg*{r}.nii*"))
                if not alt:
                    raise FileNotFoundError(f"missing rater file {path} (rater {r} of sub-task "
                                            f"{self.subtask})")
                path = alt[0]
            masks.append(binary_mask(read_array(path).squeeze(), str(path)))
        image_path = folder / "image.nii.gz"
        image = channels_first(read_array(image_path), masks[0].shape, str(image_path))
        for r, m in zip(self.raters, masks):
            check_same_shape(m, image.shape[1:], f"{folder} rater {r}", str(image_path))
        image = scale_intensity(image.astype("float32"), "percentile", str(image_path))
        return make_item(image, masks, case.id)
