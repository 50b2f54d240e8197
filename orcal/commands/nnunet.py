"""nnU-Net v2: convert a dataset to its raw layout, register the ORC trainer, export probability maps.

The whole path, in order (see docs/integrations.md):
  orcal nnunet convert --dataset curvas --root /data/curvas --option label=1 --id 501 --name CurvasPancreas \\
      --out $nnUNet_raw
  nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres
  orcal nnunet trainer ~/orcal-trainers && export nnUNet_extTrainer=~/orcal-trainers
  nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerORC
  nnUNetv2_predict -i $nnUNet_raw/Dataset501_CurvasPancreas/imagesTs -o pred -d 501 -c 3d_fullres -f 0 \\
      -tr nnUNetTrainerORC --save_probabilities
  orcal nnunet export pred --out maps
  orcal evaluate --pred maps/expected --raters $nnUNet_raw/Dataset501_CurvasPancreas/ratersTs --out eval
Without a GPU add -device cpu to nnUNetv2_train and nnUNetv2_predict; nnUNetTrainerORC_5epochs (_1epoch, ...)
is a short schedule.
"""

from __future__ import annotations

import argparse
import sys

from orcal.commands._args import add_quiet, key_value


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    conv = sub.add_parser("convert", help="an orcal dataset in nnU-Net's raw layout, the vote count k as the label")
    conv.add_argument("--dataset", required=True, help="dataset name (orcal.data.DATASETS)")
    conv.add_argument("--root", default=None, help="dataset folder")
    conv.add_argument("--task", default=None, help="task, where the dataset has several")
    conv.add_argument("--option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                      help="loader option (repeatable), e.g. label=2 or crop=64")
    conv.add_argument("--id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    conv.add_argument("--name", required=True, help="nnU-Net dataset name, e.g. CurvasPancreas")
    conv.add_argument("--out", required=True, help="nnU-Net's raw folder (nnUNet_raw)")
    conv.add_argument("--channel-name", action="append", default=[], metavar="NAME",
                      help="nnU-Net's name of each image channel, in order (repeatable), e.g. CT for scans in HU "
                           "(nnU-Net's CT normalisation); default: the loader's modality, else channel<c>")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing dataset of this id and name")
    add_quiet(conv)
    tr = sub.add_parser("trainer", help="write the module nnUNet_extTrainer needs to find nnUNetTrainerORC")
    tr.add_argument("folder", help="folder to write it into; then export nnUNet_extTrainer=FOLDER")
    ex = sub.add_parser("export", help="nnUNetv2_predict --save_probabilities output to orcal's probability maps")
    ex.add_argument("pred", help="nnUNetv2_predict's output folder (<case>.npz and <case>.nii.gz)")
    ex.add_argument("--out", required=True, help="output folder: OUT/majority, OUT/expected, OUT/expected_k")
    ex.add_argument("--majority", type=int, default=None, help="majority threshold m (default R // 2 + 1)")


def run(args: argparse.Namespace) -> int:
    from orcal.integrations import nnunet

    if args.action == "convert":
        try:
            folder = nnunet.convert_dataset(args.dataset, args.root, args.out, args.id, args.name, task=args.task,
                                            channel_names=dict(enumerate(args.channel_name)),
                                            progress=not args.quiet, overwrite=args.overwrite, **dict(args.option))
        except FileExistsError as err:
            print(f"orcal nnunet: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {folder} (dataset.json, imagesTr, labelsTr, imagesTs, ratersTs)")
    elif args.action == "trainer":
        path = nnunet.write_trainer_module(args.folder)
        print(f"wrote {path}; now: export nnUNet_extTrainer={path.parent}")
    else:
        folders = nnunet.export_probabilities(args.pred, args.out, majority=args.majority)
        for name, folder in folders.items():
            print(f"{name:>11}: {folder}/")
    return 0
