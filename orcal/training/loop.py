"""The training loop: one GPU, many GPUs (torchrun) or the CPU; validation, model selection, resume."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from orcal.models import as_tuple, build_model, init_output_bias
from orcal.training.checkpoint import (
    BEST,
    CHECKPOINT_VERSION,
    LAST,
    RESUME_KEYS,
    atomic_save,
    check_resumable,
    check_weights,
    clean_stale_temporaries,
    load_checkpoint,
    load_weights,
    weights_digest,
)
from orcal.training.config import TrainConfig, TrainResult, plain
from orcal.training.data import SeededView, collate, label_prior, load_datasets, probe, training_transform
from orcal.training.objective import Objective
from orcal.training.predict import infer_logits
from orcal.training.runtime import (
    Dist,
    all_reduce,
    autocast,
    mix,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
)


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) of ``epochs``: cosine decay from ``base_lr`` towards 0.

    Closed form, so extending a finished run continues the curve over the new length instead of staying at 0.
    """
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    nb = device.type == "cuda"
    valid = batch.get("valid")
    return (batch["image"].to(device, non_blocking=nb), batch["masks"].to(device, non_blocking=nb),
            None if valid is None else valid.to(device, non_blocking=nb))


@torch.no_grad()
def validate(model: nn.Module, val_ds: Dataset, cfg: TrainConfig, objective: Objective, spatial_dims: int,
             patch: tuple[int, ...] | None, info: Dist, device: torch.device, epoch_progress: bool
             ) -> dict[str, float]:
    """The validation set's mean loss over every valid voxel, its MR-ECE and its Dice, summed over ranks.

    MR-ECE is of the probability MR-ECE scores (an ordinal head's expected readout, a binary head's sigmoid);
    Dice is of the consensus segmentation (the majority readout) against the majority label.
    """
    from orcal.metrics import MultiRaterCalibration

    kind = "ordinal" if cfg.head == "ordinal" else "logit"
    C = getattr(model, "orcal_spec", {}).get("num_structures")
    calib = MultiRaterCalibration(kind=kind, readout="expected", majority=cfg.majority, agreement=False,
                                  num_structures=C)
    seg = MultiRaterCalibration(kind=kind, readout="majority", majority=cfg.majority, agreement=False,
                                num_structures=C) if kind == "ordinal" else calib
    model.eval()
    indices = list(range(info.rank, len(val_ds), info.world))
    bs = cfg.batch_size if spatial_dims == 2 else 1
    loader = DataLoader(Subset(val_ds, indices), batch_size=bs, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=collate)
    total = count = 0.0
    bar = loader
    if epoch_progress:
        from orcal._progress import progress_bar

        bar = progress_bar(loader, desc="  validation", leave=False, unit="batch")
    for j, batch in enumerate(bar):
        image, masks, valid = to_device(batch, device)
        logits = infer_logits(model, image, spatial_dims, patch, cfg.sw_overlap, cfg.amp, device)
        # the random rater of validation images is fixed (seeded per batch), the same every epoch
        g = torch.Generator().manual_seed(mix(cfg.seed, 99, info.rank, j))
        total += float(objective(logits, masks, valid, g, reduction="sum", num_structures=C))
        count += float(masks[:, 0].numel() if valid is None else valid.sum())
        for metric in {id(calib): calib, id(seg): seg}.values():
            metric.update(logits, masks, valid=valid)
    total, count = all_reduce([total, count], info, device)
    return {"loss": total / count if count > 0 else float("nan"), "mr_ece": float(calib.compute()["mr_ece"]),
            "dice": float(seg.compute()["dice"])}


def model_spec(cfg: TrainConfig, in_channels: int, spatial_dims: int, num_raters: int,
               num_structures: int | None = None) -> dict:
    arch = cfg.arch
    if arch == "auto":
        arch = "FPN" if spatial_dims == 2 else "unet3d"
    spec = {"arch": arch, "encoder": cfg.encoder, "in_channels": in_channels, "spatial_dims": spatial_dims,
            "head": cfg.head, "num_raters": num_raters, "model_options": plain(cfg.model_options),
            "majority": cfg.majority}
    return spec if num_structures is None else {**spec, "num_structures": num_structures}


def train(config: TrainConfig, progress: bool = True, train_dataset: Dataset | None = None,
          val_dataset: Dataset | None = None, callback: Callable[[int, int, float], None] | None = None
          ) -> TrainResult:
    """Train a model as ``config`` says and return the selected model with its history.

    Args:
        config: the run (:class:`TrainConfig`).
        progress: show tqdm progress bars (rank 0 only).
        train_dataset, val_dataset: datasets to use instead of loading ``config.dataset`` (items as
            :mod:`orcal.data` returns them); when ``train_dataset`` is given, validation uses ``val_dataset``
            only (None: no validation).
        callback: called as ``callback(epoch, step, loss)`` after every optimiser step (0-based epoch and step).

    Returns:
        :class:`TrainResult`; ``history`` has one dict per epoch (``epoch`` 1-based, ``train_loss``,
        ``val_loss``, ``val_mr_ece``, ``val_dice``, ``lr``, ``seconds``).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    cfg = copy.deepcopy(config)
    cfg.validate()
    info, device = setup_distributed(cfg.device)
    import torch.distributed as dist

    try:
        result = _train(cfg, progress, train_dataset, val_dataset, callback, info, device)
        if info.owned:
            # Tear the group down together: a gloo rank that destroys it while rank 0 still writes checkpoints
            # can abort at exit ("terminate called without an active exception").
            dist.barrier()
        return result
    finally:
        if info.owned:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, progress: bool, train_ds: Dataset | None, val_ds: Dataset | None,
           callback: Callable | None, info: Dist, device: torch.device) -> TrainResult:
    seed_everything(cfg.seed)
    if train_ds is None:
        train_ds, val_ds = load_datasets(cfg)
    in_channels, spatial_dims, num_raters, structures = probe(train_ds)
    if cfg.spatial_dims is not None and cfg.spatial_dims != spatial_dims:
        raise ValueError(f"spatial_dims={cfg.spatial_dims} but the data is {spatial_dims}D")
    patch = as_tuple(cfg.patch_size, spatial_dims)
    spec = model_spec(cfg, in_channels, spatial_dims, num_raters, structures)
    model = build_model(spec["arch"], encoder=cfg.encoder, in_channels=in_channels, spatial_dims=spatial_dims,
                        encoder_weights=cfg.encoder_weights, head=cfg.head, num_raters=num_raters,
                        num_structures=structures or 1, **cfg.model_options).to(device)
    model.orcal_spec = dict(spec)
    if cfg.prior_bias:  # a resumed run overwrites it with the checkpoint's weights below
        init_output_bias(model, label_prior(train_ds, cfg.head, num_raters, num_structures=structures))
    objective = Objective(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    if out_dir is not None and info.main:
        clean_stale_temporaries(out_dir)
    start_epoch, best_val, best_epoch, history = 0, math.inf, 0, []
    best_state: dict[str, torch.Tensor] | None = None
    if cfg.resume and out_dir is not None and (out_dir / LAST).is_file():
        path = out_dir / LAST
        ckpt = load_checkpoint(path, RESUME_KEYS)
        check_resumable(ckpt, spec, cfg, path)
        load_weights(model, ckpt["model"], path)
        check_weights(ckpt, path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            set_rng_state(ckpt["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise ValueError(f"checkpoint {path} is incomplete or damaged: {err}") from err
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        best_val, best_epoch = float(ckpt["best_val"]), int(ckpt["best_epoch"])
        best_state = ckpt["best_model"]
        if info.main and progress:
            print(f"resuming from {path} after epoch {start_epoch}")
            done = int(ckpt["config"].get("epochs", start_epoch))
            if cfg.epochs != done:
                print(f"extending the run from {done} to {cfg.epochs} epochs: from epoch {start_epoch + 1} on the "
                      f"learning rate follows the cosine schedule over {cfg.epochs} epochs")
    elif cfg.resume and out_dir is not None and (out_dir / BEST).is_file():
        raise ValueError(f"cannot resume: {out_dir} holds {BEST} (the selected weights) but no {LAST} (the training "
                         f"state); training again would overwrite {out_dir / BEST}. Use another --out, or remove it")
    elif cfg.resume and info.main and progress:
        print(f"no checkpoint in {out_dir} to resume from; starting a new run")

    net: nn.Module = model
    if info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    from torch.utils.data.distributed import DistributedSampler

    view = SeededView(train_ds, training_transform(patch, cfg.fg_prob, cfg.augment), cfg.seed,
                       cfg.patches_per_image)
    sampler = DistributedSampler(view, num_replicas=info.world, rank=info.rank, shuffle=True, seed=cfg.seed)
    # A last batch of one image breaks BatchNorm (smp encoders) at a 1x1 bottleneck: drop a ragged last batch
    # when an epoch has more than one; the permutation changes every epoch, so every image is still seen.
    loader = DataLoader(view, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=collate, pin_memory=device.type == "cuda",
                        drop_last=len(sampler) > cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed))
    show = progress and info.main
    steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        view.set_epoch(epoch)
        target_gen = torch.Generator().manual_seed(mix(cfg.seed, epoch, info.rank, 7))
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs)
        net.train()
        loss_sum, n_steps = 0.0, 0
        bar = None
        if show:
            from orcal._progress import progress_bar

            bar = progress_bar(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            image, masks, valid = to_device(batch, device)
            with autocast(cfg.amp, device):
                logits = net(image)
            loss = objective(logits, masks, valid, target_gen, num_structures=structures)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the training loss became {value} at epoch {epoch + 1}, step {step + 1}; "
                                         "lower the learning rate or check the data")
            loss_sum, n_steps = loss_sum + value, n_steps + 1
            if bar is not None:
                bar.update(1)
                if step % cfg.log_every == 0 or step + 1 == steps:
                    bar.set_postfix(loss=f"{loss_sum / n_steps:.4f}")
            if callback is not None:
                callback(epoch, step, value)
        if bar is not None:
            bar.close()
        train_loss = all_reduce([loss_sum, n_steps], info, device)
        train_loss = train_loss[0] / max(train_loss[1], 1)
        val = {"loss": None, "mr_ece": None, "dice": None}
        if val_ds is not None and len(val_ds) > 0:
            val = validate(model, val_ds, cfg, objective, spatial_dims, patch, info, device, show)
        val_loss = val["loss"]
        lr = optimizer.param_groups[0]["lr"]
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_mr_ece": val["mr_ece"],
                  "val_dice": val["dice"], "lr": lr, "seconds": time.perf_counter() - t0}
        history.append(record)
        score = val_loss if val_loss is not None and math.isfinite(val_loss) else None
        improved = best_state is None or score is None or score < best_val
        if improved:
            best_val = score if score is not None else math.inf
            best_epoch = epoch + 1
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if info.main and out_dir is not None:
            if improved:
                atomic_save({"version": CHECKPOINT_VERSION, "model": best_state,
                             "model_sha256": weights_digest(best_state), "model_spec": spec,
                             "config": cfg.to_dict(), "epoch": epoch + 1, "val_loss": val_loss}, out_dir / BEST)
            state = model.state_dict()
            atomic_save({"version": CHECKPOINT_VERSION, "model": state, "model_sha256": weights_digest(state),
                         "model_spec": spec,
                         "config": cfg.to_dict(), "optimizer": optimizer.state_dict(),
                         "rng": rng_state(), "epoch": epoch + 1,
                         "history": history, "best_val": best_val, "best_epoch": best_epoch,
                         "best_model": best_state}, out_dir / LAST)
        if show:
            shown = "-" if val_loss is None else \
                f"{val_loss:.4f}, val MR-ECE {val['mr_ece']:.4f}, val Dice {val['dice']:.4f}"
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {shown}, "
                  f"{record['seconds']:.1f} s" + (" *" if improved else ""))

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, config=cfg, history=history, best_epoch=best_epoch,
                       checkpoint_path=str(out_dir / BEST) if out_dir is not None else None,
                       num_raters=num_raters, head=cfg.head,
                       best_val_loss=best_val if math.isfinite(best_val) else None,
                       spatial_dims=spatial_dims, in_channels=in_channels, num_structures=structures)
