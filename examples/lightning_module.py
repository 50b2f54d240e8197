"""A Lightning module that trains ORC and logs orcal's pooled metrics with ``self.log``.

The scalar metrics (``MultiRaterECE``, ``MultiRaterAUROC``, ``MultiRaterDice``) are torchmetrics metrics with
summed states: logging the metric object makes Lightning log its pooled value over the whole validation set
each epoch (not a mean of per-batch values), summed over ranks under DDP. Lower MR-ECE is better
(``MultiRaterECE.higher_is_better`` is False): ``ModelCheckpoint`` keeps the epoch with the lowest validation
MR-ECE and ``EarlyStopping`` stops when it no longer falls, both with ``mode="min"``.

    python examples/lightning_module.py --out /tmp/orcal-lightning    # about 15 s on a 2-core CPU
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection

from orcal import OrdinalLoss
from orcal.data.synthetic import make_synthetic
from orcal.metrics import MultiRaterAUROC, MultiRaterDice, MultiRaterECE


class ORCModule(L.LightningModule):
    """A small 2D network with an ``R + 1``-level ordinal head, trained on the rater stack directly."""

    def __init__(self, raters: int = 3, rps_weight: float = 1.0, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=2, dilation=2),
                                 nn.ReLU(), nn.Conv2d(16, raters + 1, 1))
        # targets: the (B, R, *S) rater stack; num_raters checks the head's R + 1 channels
        self.loss = OrdinalLoss(rps_weight=rps_weight, from_masks=True, num_raters=raters)
        # one statistics state for the three (torchmetrics' compute group); the expected readout
        self.val_metrics = MetricCollection({"mr_ece": MultiRaterECE(kind="ordinal", readout="expected"),
                                             "auc": MultiRaterAUROC(kind="ordinal", readout="expected"),
                                             "dice": MultiRaterDice(kind="ordinal", readout="expected")},
                                            prefix="val/")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def training_step(self, batch, batch_idx):
        image, masks = batch
        loss = self.loss(self(image), masks)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        image, masks = batch
        self.val_metrics.update(self(image), masks)
        self.log_dict(self.val_metrics)  # each metric object: Lightning computes the pooled value at epoch end

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def loaders(raters: int, size: int, n_train: int, n_val: int, seed: int) -> tuple[DataLoader, DataLoader]:
    data = make_synthetic(n=n_train + n_val, R=raters, shape=(size, size), seed=seed)
    images, masks = torch.from_numpy(data.images), torch.from_numpy(data.masks)
    train = TensorDataset(images[:n_train], masks[:n_train])
    val = TensorDataset(images[n_train:], masks[n_train:])
    return DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=8)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="orcal-lightning", help="folder for checkpoints and logs")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--raters", type=int, default=3)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patience", type=int, default=5, help="epochs without a lower val/mr_ece before stopping")
    args = parser.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    train, val = loaders(args.raters, args.size, n_train=48, n_val=16, seed=args.seed)
    module = ORCModule(raters=args.raters)
    mode = "max" if MultiRaterECE.higher_is_better else "min"  # "min": Lightning does not read the direction
    best = ModelCheckpoint(dirpath=f"{args.out}/checkpoints", monitor="val/mr_ece", mode=mode)
    stop = EarlyStopping(monitor="val/mr_ece", mode=mode, patience=args.patience)
    epochs: list[float] = []

    class Record(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                epochs.append(float(trainer.callback_metrics["val/mr_ece"]))

    trainer = L.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, default_root_dir=args.out,
                        callbacks=[best, stop, Record()], logger=L.pytorch.loggers.CSVLogger(args.out),
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2)
    trainer.fit(module, train, val)
    for epoch, value in enumerate(epochs):
        print(f"epoch {epoch}: val/mr_ece {value:.4f}")
    print(f"best checkpoint (lowest val/mr_ece {float(best.best_model_score):.4f}): {best.best_model_path}")
    return {"epochs": epochs, "best_score": float(best.best_model_score), "best_path": best.best_model_path,
            "module": module, "val": val, "mode": mode}


if __name__ == "__main__":
    main()
