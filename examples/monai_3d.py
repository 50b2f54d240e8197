"""A MONAI 3D loop with orcal and no glue: NIfTI rater files → ORC training → sliding-window evaluation.

Each case is an image and one label file per rater (here written from orcal's synthetic generator, as a
team's own files would be on disk). MONAI loads them; ``StackRatersd`` turns the raters' label maps into one
uint8 rater stack and their union; ``RandCropByPosNegLabeld`` samples patches around the union;
``ORCTargetd`` gives the vote count ``k``; a MONAI ``UNet`` with ``R + 1`` output channels trains with
``OrdinalLoss(num_raters=R)`` (which checks the head) under bf16 autocast; ``sliding_window_inference``
predicts whole volumes and ``MultiRaterCalibrationMetric`` scores them. The best epoch is the one with the
*lowest* MR-ECE (``metric_cmp_fn``), and ``ORCReadoutd`` turns its logits into the probability map a person
looks at, saved as NIfTI with the image's affine.

    python examples/monai_3d.py --out /tmp/orcal-monai3d            # about 15 s on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader, Dataset, decollate_batch, list_data_collate
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from monai.transforms import Compose, DeleteItemsd, LoadImaged, RandCropByPosNegLabeld, SaveImage, ScaleIntensityd

from orcal import OrdinalLoss
from orcal.data.synthetic import make_synthetic
from orcal.integrations.monai import MultiRaterCalibrationMetric, ORCReadoutd, ORCTargetd, StackRatersd, metric_cmp_fn


def write_cases(root: str, n: int, raters: int, shape: tuple[int, ...], seed: int) -> list[dict[str, str]]:
    """``n`` cases on disk: ``case{i}_image.nii.gz`` and ``case{i}_rater{r}.nii.gz`` (label 1 = the lesion)."""
    os.makedirs(root, exist_ok=True)
    data = make_synthetic(n=n, R=raters, shape=shape, seed=seed)
    affine = np.diag([0.8, 0.8, 1.5, 1.0])  # anisotropic CT-like spacing, kept through the pipeline
    cases = []
    for i in range(n):
        item = {"image": os.path.join(root, f"case{i}_image.nii.gz")}
        nib.save(nib.Nifti1Image(data.images[i, 0], affine), item["image"])
        for r in range(raters):
            item[f"rater{r}"] = os.path.join(root, f"case{i}_rater{r}.nii.gz")
            nib.save(nib.Nifti1Image(data.masks[i, r].astype(np.int16), affine), item[f"rater{r}"])
        cases.append(item)
    return cases


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="orcal-monai3d", help="folder for the generated cases")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--raters", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="volume side (voxels)")
    parser.add_argument("--patch", type=int, default=16, help="training patch and sliding window side")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    R = args.raters
    cases = write_cases(args.out, args.cases, R, (args.size, args.size, args.size * 3 // 4), args.seed)
    train_cases, val_cases = cases[: -2], cases[-2:]
    raters = [f"rater{r}" for r in range(R)]

    load = [LoadImaged(["image", *raters], ensure_channel_first=True), ScaleIntensityd("image"),
            StackRatersd(raters, name="masks", label=1, union_key="union"), ORCTargetd("masks", name="k", num_raters=R)]
    train_tf = Compose([*load, RandCropByPosNegLabeld(["image", "k"], label_key="union", num_samples=4,
                                                      spatial_size=(args.patch,) * 3, pos=1, neg=1),
                        DeleteItemsd([*raters, "masks", "union"])])  # what stayed at full size
    train_loader = DataLoader(Dataset(train_cases, train_tf), batch_size=2, shuffle=True,
                              collate_fn=list_data_collate)
    val_loader = DataLoader(Dataset(val_cases, Compose([*load, DeleteItemsd(raters)])), batch_size=1)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = UNet(spatial_dims=3, in_channels=1, out_channels=R + 1, channels=(8, 16, 32), strides=(2, 2),
                 num_res_units=1).to(device)
    loss_fn = OrdinalLoss(rps_weight=1.0, num_raters=R)  # takes MONAI's (B, 1, *S) MetaTensor targets as they are
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    metric = MultiRaterCalibrationMetric(kind="ordinal", readout="expected", num_raters=R)
    better = metric_cmp_fn("mr_ece")  # lower MR-ECE is better: a Dice-era "greater" keeps the worst epoch
    readout = ORCReadoutd("pred", readout="expected")  # the map to look at (channel 0 of the logits is not)

    history, best = [], None
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for batch in train_loader:
            image, k = batch["image"].to(device), batch["k"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn(model(image), k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            for batch in val_loader:
                logits = sliding_window_inference(batch["image"].to(device), roi_size=(args.patch,) * 3,
                                                  sw_batch_size=4, predictor=model, overlap=0.25)
                metric(decollate_batch(logits.float()), decollate_batch(batch["k"].to(device)))
        result = metric.aggregate()  # a dict of floats
        metric.reset()
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **{key: result[key] for key in
                                                                             ("mr_ece", "auc", "dice")}})
        if best is None or better(result["mr_ece"], best["mr_ece"]):
            best = history[-1]
            torch.save(model.state_dict(), os.path.join(args.out, "best_model.pt"))
            # the last validation volume's expected-fraction map (1, *S), with the image's affine
            prob = readout({"pred": decollate_batch(logits.float())[0]})["pred"]
            SaveImage(output_dir=args.out, output_postfix="prob", separate_folder=False, print_log=False)(prob)
        print(f"epoch {epoch}: loss {history[-1]['loss']:.4f}  val MR-ECE {result['mr_ece']:.4f}  "
              f"AUC {result['auc']:.4f}  Dice {result['dice']:.4f}  ({result['n_images']} volumes, "
              f"{result['n_pairs']} voxel-rater pairs)")
    print(f"best epoch {best['epoch']}: val MR-ECE {best['mr_ece']:.4f}")
    return {"history": history, "affine": batch["image"].affine, "best": best}


if __name__ == "__main__":
    main()
