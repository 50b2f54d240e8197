"""docs/integrations.md's MONAI, ignite and Lightning recipes run as written, on tiny generated NIfTI cases with
the real packages: resampling (float32 vote counts), cropping on the union, lower-is-better model selection and
early stopping, and the readout map to look at."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")
pytest.importorskip("orcal.integrations.monai")

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
R = 3


def recipe(name: str) -> str:
    """The python block that follows ``<!-- recipe: name -->`` in docs/integrations.md."""
    found = re.search(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert found, f"docs/integrations.md has no recipe {name!r}"
    return found.group(1)


def _cases(root: Path, n: int = 3, shape=(32, 32, 14)) -> list[dict[str, str]]:
    """CT-like cases on a (1, 1, 2.5) mm grid (so Spacingd resamples): a sphere that grows with the rater."""
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    cases = []
    for c in range(n):
        centre = np.array([14 + 2 * c, 16, 7])[:, None, None, None]
        dist = np.sqrt((((grid - centre) * np.array([1, 1, 2.5])[:, None, None, None]) ** 2).sum(0))
        item = {"image": str(root / f"case{c}_ct.nii.gz")}
        ct = np.where(dist < 7, 100.0, -40.0) + rng.normal(0, 20, shape)
        nib.save(nib.Nifti1Image(ct.astype(np.float32), affine), item["image"])
        for r in range(R):
            item[f"rater{r}"] = str(root / f"case{c}_r{r}.nii.gz")
            nib.save(nib.Nifti1Image((dist < 5 + 1.5 * r).astype(np.int16), affine), item[f"rater{r}"])
        cases.append(item)
    return cases


def _setup(tmp_path: Path, max_epochs: int = 2) -> dict:
    cases = _cases(tmp_path)
    out = tmp_path / "runs"
    out.mkdir()
    assert "train_files" in recipe("setup")  # the block users fill in names what the test provides
    torch.manual_seed(0)
    return {"train_files": cases[:2], "val_files": cases[2:], "R": R, "patch": (16, 16, 16),
            "max_epochs": max_epochs, "out": str(out), "__name__": "recipe"}


def _run(code: str, ns: dict, name: str) -> None:
    exec(compile(code, f"docs/integrations.md:{name}", "exec"), ns)


def _continue_from_monai(ns: dict) -> None:
    """The engine and Lightning recipes continue from the MONAI one's transforms and model (one epoch of it)."""
    epochs, ns["max_epochs"] = ns["max_epochs"], 1
    _run(recipe("monai"), ns, "monai")
    ns["max_epochs"] = epochs


@pytest.mark.slow
def test_monai_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _setup(tmp_path)
    _run(recipe("monai"), ns, "monai")
    batch = next(iter(ns["val_loader"]))
    assert batch["k"].dtype == torch.float32  # what Spacingd hands the loss and the metric
    assert torch.equal(batch["k"], batch["k"].round()) and float(batch["k"].max()) == R
    torch.testing.assert_close(torch.as_tensor(batch["image"].affine)[0].diag()[:3].abs().double(),
                               torch.tensor([1.5, 1.5, 2.0], dtype=torch.float64))
    assert len(ns["history"]) == 2 and ns["best_metric"] == min(ns["history"])  # lower is better
    assert Path(ns["out"], "best_metric_model.pth").is_file()
    prob = ns["prob"]
    assert prob.shape == batch["image"].shape[1:] and 0 <= float(prob.min()) and float(prob.max()) <= 1
    torch.testing.assert_close(torch.as_tensor(prob.affine), torch.as_tensor(batch["image"].affine[0]))


@pytest.mark.slow
def test_ignite_recipe(tmp_path, monkeypatch):
    pytest.importorskip("ignite")
    monkeypatch.chdir(tmp_path)
    ns = _setup(tmp_path, max_epochs=3)
    _continue_from_monai(ns)
    code = recipe("ignite")
    body, last = code.rstrip().rsplit("\n", 1)
    assert last == "trainer.run()"
    _run(body, ns, "ignite")
    from ignite.engine import Events

    seen = []
    ns["evaluator"].add_event_handler(Events.COMPLETED, lambda e: seen.append(e.state.metrics["val_mr_ece"]))
    _run(last, ns, "ignite")
    assert len(seen) == 3 and ns["trainer"].state.epoch == 3  # EarlyStopping(patience=10) let it run
    assert ns["evaluator"].state.best_metric == pytest.approx(min(seen))  # the lowest is the best
    saved = list(Path(ns["out"]).glob("*key_metric*.pt"))
    assert len(saved) == 1
    assert ns["evaluator"].state.best_metric_epoch == 1 + seen.index(min(seen))
    maps = list(Path(ns["out"]).rglob("*_prob.nii.gz"))
    assert maps, "SaveImaged wrote the readout maps"
    img = nib.load(str(maps[0]))
    assert img.shape[:3] == tuple(ns["val_loader"].dataset[0]["image"].shape[1:])
    data = np.asarray(img.dataobj)
    assert 0 <= data.min() and data.max() <= 1  # the probability map, not the level-0 logit


@pytest.mark.slow
def test_lightning_recipe(tmp_path, monkeypatch):
    L = pytest.importorskip("lightning")
    pytest.importorskip("torchmetrics")
    monkeypatch.chdir(tmp_path)
    ns = _setup(tmp_path, max_epochs=3)
    _continue_from_monai(ns)
    code = recipe("lightning")
    body, last = code.rstrip().rsplit("\n", 1)
    assert last.startswith("trainer.fit(")
    _run(body, ns, "lightning")
    seen = []

    class Record(L.Callback):
        def on_validation_epoch_end(self, trainer, module):
            if not trainer.sanity_checking:
                seen.append(float(trainer.callback_metrics["val_mr_ece"]))

    ns["trainer"].callbacks.append(Record())
    _run(last, ns, "lightning")
    assert len(seen) == 3 and ns["checkpoint"].mode == "min"
    assert float(ns["checkpoint"].best_model_score) == pytest.approx(min(seen), rel=1e-6)
    assert Path(ns["checkpoint"].best_model_path).is_file()
