"""Checkpoints: atomic writes, loading with clear errors, resuming under the run's own settings.

``out_dir/last.pt`` holds everything needed to resume, ``out_dir/best.pt`` the selected weights; each is
written to a temporary file in the same folder and then renamed, so a crash never leaves a truncated
checkpoint. Loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orcal.models import build_model
from orcal.training.config import TrainConfig
from orcal.training.runtime import resolve_device

LAST, BEST = "last.pt", "best.pt"
CHECKPOINT_VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the target folder, then ``os.replace``: readers see the old file
    or the complete new one, never a partial write; on failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint gets a normal file's mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def weights_digest(state: dict) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: written beside the weights, so that a
    checkpoint whose bytes were damaged after the write is refused instead of predicting with other weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}={t!r};".encode())
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: What a ``last.pt`` holds beyond the weights: everything :func:`train` needs to resume.
RESUME_KEYS = ("optimizer", "rng", "epoch", "history", "best_val", "best_epoch", "best_model", "config")


def load_checkpoint(path: str | os.PathLike, required: Sequence[str] = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} could not be read as an orcal checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_spec" not in ckpt:
        raise ValueError(f"checkpoint {path} is not an orcal checkpoint (no 'model' / 'model_spec')")
    missing = [key for key in required if key not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}"
                         + (" (a best.pt holds weights only; resume needs last.pt)" if "optimizer" in missing else ""))
    return ckpt


def check_weights(ckpt: dict, path: str | os.PathLike, key: str = "model") -> None:
    """Refuse damaged weights, naming the file: a checksum that does not match (bytes changed after the
    write) or NaN / infinite values (a diverged run), either of which would predict garbage and exit 0."""
    state = ckpt[key]
    want = ckpt.get(f"{key}_sha256")
    if want is not None and weights_digest(state) != want:
        raise ValueError(f"checkpoint {path} is damaged: its weights do not match the checksum written with them "
                         "(the file changed after it was saved); use another copy or retrain")
    bad = [name for name, t in state.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"checkpoint {path} holds NaN or infinite weights in {len(bad)} tensor(s) ({bad[0]}, ...): "
                         "the run diverged or the file is damaged")


def load_weights(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"checkpoint {path} does not fit its own model (missing or wrong-shaped weights): "
                         f"{str(err).splitlines()[0]}") from err


def clean_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the temporary files that a checkpoint write killed midway left in ``out_dir`` (see
    :func:`atomic_save`); returns what was removed."""
    removed = []
    for name in (LAST, BEST):
        for tmp in out_dir.glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def model_from_spec(spec: dict) -> nn.Module:
    opts = dict(spec.get("model_options", {}))
    model = build_model(spec["arch"], encoder=spec.get("encoder", "resnet18"), in_channels=spec["in_channels"],
                        spatial_dims=spec["spatial_dims"], encoder_weights=None, head=spec["head"],
                        num_raters=spec["num_raters"], num_structures=spec.get("num_structures") or 1, **opts)
    model.orcal_spec = dict(spec)
    return model


def load_model(checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, TrainConfig]:
    """Load a model written by :func:`train` (``best.pt`` or ``last.pt``: the weights stored under ``model``).

    Returns ``(model, config)``: the model in eval mode on ``device`` with ``model.orcal_spec`` (arch, head,
    num_raters, in_channels, spatial_dims), and the run's :class:`TrainConfig`.
    """
    ckpt = load_checkpoint(checkpoint_path)
    try:
        model = model_from_spec(ckpt["model_spec"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"checkpoint {checkpoint_path} is incomplete: its model_spec lacks {err}") from err
    load_weights(model, ckpt["model"], Path(checkpoint_path))
    check_weights(ckpt, checkpoint_path)
    model.to(resolve_device(device)).eval()
    return model, TrainConfig.from_dict(ckpt.get("config", {}))


#: Settings that may differ when a run is resumed: where and how it runs, and (extending it) its length.
RESUME_MAY_CHANGE = frozenset({"epochs", "resume", "out_dir", "root", "device", "amp", "num_workers", "log_every"})


def check_resumable(ckpt: dict, spec: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume a run under settings other than its own, naming the first that differs."""
    old = ckpt["model_spec"]
    for key in ("arch", "encoder", "in_channels", "spatial_dims", "head", "num_raters", "num_structures"):
        if old.get(key) != spec.get(key):
            raise ValueError(f"cannot resume {path}: it was trained with {key}={old.get(key)!r}, this run has "
                             f"{key}={spec.get(key)!r}")
    old_cfg, new_cfg = ckpt["config"], cfg.to_dict()
    for key in sorted(set(new_cfg) - RESUME_MAY_CHANGE):
        if key in old_cfg and old_cfg[key] != new_cfg[key]:
            raise ValueError(f"cannot resume {path}: it was trained with {key}={old_cfg[key]!r}, this run has "
                             f"{key}={new_cfg[key]!r}. Resume with the run's own settings (only "
                             f"{', '.join(sorted(RESUME_MAY_CHANGE - {'resume'}))} may change), or start a new run "
                             "in another folder")
    done, planned = int(ckpt["epoch"]), int(old_cfg.get("epochs", ckpt["epoch"]))
    if cfg.epochs < done:
        raise ValueError(f"cannot resume {path}: it has already trained {done} epochs, more than epochs="
                         f"{cfg.epochs}; pass epochs >= {done}")
    if cfg.epochs < planned:
        # the learning rate follows a cosine over the planned epochs: a shorter plan would jump it down mid-run
        raise ValueError(f"cannot resume {path} with epochs={cfg.epochs}: the run was planned for {planned} epochs "
                         f"({done} done) and its learning rate follows a cosine schedule over those {planned}; "
                         f"lowering it to {cfg.epochs} would change the schedule mid-run. Resume with epochs >= "
                         f"{planned} (leave --epochs out to finish the run as planned), or start a new run in "
                         "another folder")
