"""Extension points: a strategy, a metric or a dataset registered from outside the package works everywhere,
and every registry is one ``register`` function beside a read-only, live mapping (docs/design.md, Registries)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orcal import data, fusion
from orcal.metrics import registry
from orcal.ops import backends


def unanimous(masks: torch.Tensor, *, margin: float = 0.0) -> torch.Tensor:
    """Foreground where every rater agrees, softened by ``margin`` elsewhere (a toy strategy)."""
    m = fusion.check_masks(masks)
    return torch.where(m.all(1), 1.0, margin * m.float().mean(1))


@pytest.fixture
def toy_strategy():
    fusion.register("unanimous", unanimous, label="Unanimous vote", options=("margin",))
    yield "unanimous"
    fusion.unregister("unanimous")


@pytest.fixture
def toy_metric():
    registry.register_metric("pairs", "Voxel-rater pairs", lambda st: st.n.sum(1).double(), higher_is_better=True)
    yield "pairs"
    registry.unregister_metric("pairs")


def test_registry_errors():
    with pytest.raises(ValueError, match="already registered"):
        fusion.register("soft", unanimous)
    with pytest.raises(ValueError, match="identifier"):
        fusion.register("not a name", unanimous)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        fusion.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        registry.register_metric("auc", "AUC", lambda st: st.n)


def test_a_registered_strategy_trains_fuses_and_reports(toy_strategy, toy_metric, tmp_path):
    from orcal.cli import main
    from orcal.experiment import DatasetSpec, ExperimentConfig, run_experiment
    from orcal.train import TrainConfig, train

    assert toy_strategy in fusion.METHODS
    masks = torch.tensor([[[[1, 0]], [[1, 1]]]], dtype=torch.uint8)
    assert fusion.make_target(toy_strategy, masks, margin=0.5).tolist() == [[[1.0, 0.25]]]
    # training: its option reaches it, the other strategies' options do not
    data = {"n": 12, "shape": (16, 16), "R": 3}
    result = train(TrainConfig(dataset_options=data, method=toy_strategy, arch="unet-small", epochs=1, batch_size=4,
                               max_steps_per_epoch=1, fusion_options={"margin": 0.3, "sigma": 2.0}), progress=False)
    assert result.head == "binary" and len(result.history) == 1
    # orcal fuse --method and its generic --option
    for r in (1, 2):
        np.save(tmp_path / f"r{r}.npy", np.eye(4, dtype=np.uint8))
    out = tmp_path / "fused"
    assert main(["fuse", "--method", toy_strategy, "--option", "margin=0.2", "--out", str(out),
                 str(tmp_path / "r1.npy"), str(tmp_path / "r2.npy")]) == 0
    assert np.load(out / f"{toy_strategy}.npy").tolist() == np.eye(4).tolist()
    assert main(["fuse", "--method", toy_strategy, "--sigma", "1", "--out", str(out),
                 str(tmp_path / "r1.npy"), str(tmp_path / "r2.npy")]) == 2
    # the experiment: a row with the strategy's label, and the metric in the results
    cfg = ExperimentConfig(datasets=[DatasetSpec("synthetic", options={"n": 16, "shape": (16, 16), "R": 3})],
                           methods=("soft", toy_strategy), arch="unet-small", epochs=1, max_steps=1, n_boot=20,
                           out=str(tmp_path / "exp"), progress=False)
    results = run_experiment(cfg, log=lambda *args: None)
    summary = results["runs"]["Synthetic (R=3)"][toy_strategy]  # the data names itself
    assert summary["pairs"]["value"] > 0 and "mr_ece" in summary
    table = (tmp_path / "exp" / "table1_mr_ece.md").read_text()
    assert "Unanimous vote" in table and "Soft Consensus" in table
    assert table.index("Soft Consensus") < table.index("Unanimous vote")  # registration order


def test_a_registered_metric_reaches_every_consumer(toy_metric, tmp_path):
    import orcal
    from orcal.experiment.tables import metric_results_table as table_of
    from orcal.metrics import MultiRaterCalibration

    p = torch.rand(2, 4, 4)
    masks = (torch.rand(2, 3, 4, 4) < 0.5).to(torch.uint8)
    st = orcal.calibration_stats(p, masks)
    assert orcal.calibration_metrics(st)["pairs"] == 2 * 16 * 3
    assert orcal.bootstrap(st, n_boot=10)["pairs"]["value"] == 96
    metric = MultiRaterCalibration()
    metric.update(p, masks)
    assert metric.compute()["pairs"] == 96
    runs = {"d": {"soft": {"pairs": {"mean": 96.0, "std": 0.0}}}}
    t = table_of(runs, "pairs", title="Table 4")
    assert t.higher_is_better and "Voxel-rater pairs" in t.to_markdown()


class TinyRaters(data.SyntheticMultiRater):
    """A toy loader: the synthetic generator's layout under another name, 12 cases of 16 x 16 by default."""

    def __init__(self, root=None, split=None, task=None, transform=None, **options):
        super().__init__(root, split=split, task=task, transform=transform, **{"n": 12, "shape": (16, 16), **options})


@pytest.fixture
def toy_dataset():
    data.register_dataset("tiny_raters", TinyRaters)
    yield "tiny_raters"
    data.unregister_dataset("tiny_raters")


def test_a_registered_dataset_loads_trains_and_plans(toy_dataset, tmp_path):
    from orcal.cli import main
    from orcal.experiment import DatasetSpec

    assert data.DATASETS[toy_dataset] is TinyRaters and data.dataset_class(toy_dataset) is TinyRaters
    assert len(data.load_dataset(toy_dataset)) == 12
    assert DatasetSpec.parse(toy_dataset).name == toy_dataset  # orcal experiment --datasets
    assert main(["train", "--dataset", toy_dataset, "--arch", "unet-small", "--epochs", "1", "--max-steps", "1",
                 "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu"]) == 0
    with pytest.raises(ValueError, match="already registered"):
        data.register_dataset(toy_dataset, TinyRaters)
    with pytest.raises(TypeError, match="Dataset class"):
        data.register_dataset("not_a_class", lambda root: None)


def test_registered_dataset_is_gone_after_unregister():
    data.register_dataset("tiny_raters", TinyRaters)
    data.unregister_dataset("tiny_raters")
    assert "tiny_raters" not in data.DATASETS
    with pytest.raises(ValueError, match="unknown dataset 'tiny_raters'"):
        data.load_dataset("tiny_raters")


@pytest.mark.parametrize("mapping", [lambda: fusion.STRATEGIES, lambda: registry.METRICS, lambda: data.DATASETS,
                                     lambda: backends.TABLE])
def test_every_registry_is_a_read_only_live_mapping(mapping):
    """One style: change a registry through its register function, read it through its mapping."""
    view = mapping()
    first = next(iter(view))
    with pytest.raises(TypeError):
        view[first] = view[first]  # type: ignore[index]
    with pytest.raises(TypeError):
        del view[first]  # type: ignore[attr-defined]
    fusion.register("toy_live", unanimous)
    registry.register_metric("toy_live", "Toy", lambda st: st.n.sum(1).double())
    data.register_dataset("toy_live", TinyRaters)
    backends.register_backend("toy_live", "orcal")
    try:
        assert "toy_live" in view
    finally:
        fusion.unregister("toy_live")
        registry.unregister_metric("toy_live")
        data.unregister_dataset("toy_live")
        backends.unregister_backend("toy_live")
    assert "toy_live" not in view
