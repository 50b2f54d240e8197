"""Network factory and readouts.

* 2D: any `segmentation_models_pytorch <https://smp.readthedocs.io>`_ architecture and encoder (FPN with a
  ResNet-18 encoder by default, as in the paper's experiments), imported lazily (``pip install orcal[models]``);
  ``arch="unet-small"`` is a tiny built-in U-Net that needs nothing else (fast CPU tests and demos).
* 3D: ``arch="unet3d"``, a compact built-in 3D U-Net; with MONAI installed, its networks by name
  (``arch="monai:UNet"``, ``"monai:SegResNet"``, ...).

Every model accepts inputs of any spatial size: it pads to the multiple its down-sampling needs and crops
the output back, so whole images of odd sizes go through unchanged.

Heads: ``head="ordinal"`` has ``R + 1`` output channels (one logit per consensus level 0..R), ``head="binary"``
one foreground logit. :func:`probability` turns either into a foreground probability ``(B, *S)``.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from orcal.heads import KINDS, Head

HEADS = KINDS  # the head kinds, as orcal.heads names them
BUILTIN_2D = ("unet-small",)
BUILTIN_3D = ("unet3d",)


def head_channels(head: str, num_raters: int | None = None, num_structures: int = 1) -> int:
    """Output channels of a head: ``R + 1`` for ``"ordinal"``, 1 for ``"binary"``; times ``num_structures``
    for several structures (SPEC §11: structure-major). :attr:`orcal.heads.Head.channels`."""
    return Head(head, num_raters=num_raters if num_raters is None else int(num_raters),
                num_structures=num_structures).channels


# --- padding wrapper ------------------------------------------------------------------------------------

class PadToMultiple(nn.Module):
    """Run ``net`` on the input zero-padded (at the end of each spatial axis) to a multiple of ``multiple``,
    then crop the output back to the input's size."""

    def __init__(self, net: nn.Module, multiple: int, spatial_dims: int):
        super().__init__()
        self.net, self.multiple, self.spatial_dims = net, int(multiple), int(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"input must be (B, C, *S) with {self.spatial_dims} spatial dims, got {tuple(x.shape)}")
        spatial = x.shape[2:]
        pads: list[int] = []
        for n in reversed(spatial):
            pads += [0, (-n) % self.multiple]
        if any(pads):
            x = F.pad(x, pads)
        y = self.net(x)
        if any(pads):
            y = y[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]
        return y


# --- built-in U-Nets (2D and 3D) ------------------------------------------------------------------------

def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm: independent of the batch size (patch batches of 1-2 are common in 3D), no running stats.
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


class _Block(nn.Sequential):
    def __init__(self, conv: type[nn.Module], c_in: int, c_out: int):
        super().__init__(conv(c_in, c_out, 3, padding=1, bias=False), _norm(c_out), nn.LeakyReLU(0.01, inplace=True),
                         conv(c_out, c_out, 3, padding=1, bias=False), _norm(c_out), nn.LeakyReLU(0.01, inplace=True))


class UNet(nn.Module):
    """A plain U-Net in 2D or 3D: ``depth`` down-samplings, channels ``base * 2**level``, GroupNorm, LeakyReLU.

    Inputs must be divisible by ``2**depth`` on every spatial axis (:func:`build_model` wraps it in
    :class:`PadToMultiple` so that any size works).
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2, base_channels: int = 16,
                 depth: int = 4, max_channels: int = 320):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if depth < 1 or base_channels < 1:
            raise ValueError(f"depth and base_channels must be >= 1, got {depth} and {base_channels}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        up = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        chans = [min(base_channels * 2**i, max_channels) for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList([_Block(conv, in_channels, chans[0])] +
                                  [_Block(conv, chans[i], chans[i + 1]) for i in range(depth)])
        self.pool = pool(2)
        self.up = nn.ModuleList([up(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))])
        self.dec = nn.ModuleList([_Block(conv, 2 * chans[i], chans[i]) for i in reversed(range(depth))])
        self.out = conv(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.out(x)


# --- external libraries ---------------------------------------------------------------------------------

def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError as err:
        raise ImportError("2D architectures other than 'unet-small' need segmentation_models_pytorch: "
                          "pip install 'orcal[models]'") from err
    return smp


def _smp_model(arch: str, encoder: str, in_channels: int, out_channels: int, encoder_weights: str | None,
               **kw) -> nn.Module:
    smp = _smp()
    if encoder not in smp.encoders.get_encoder_names():
        raise ValueError(f"unknown encoder {encoder!r}; segmentation_models_pytorch offers e.g. resnet18, "
                         f"resnet34, efficientnet-b0 (see smp.encoders.get_encoder_names())")
    if encoder_weights is None:
        try:
            return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels,
                                    classes=out_channels, **kw)
        except KeyError as err:
            raise ValueError(f"unknown architecture {arch!r}; use 'unet-small', 'unet3d', 'monai:<Net>' or a "
                             f"segmentation_models_pytorch architecture (FPN, Unet, UnetPlusPlus, DeepLabV3Plus, "
                             f"...): {err}") from err
    # Pretrained weights are downloaded on first use: bound every network wait so an offline machine gets a
    # clear error instead of a hang.
    old_timeout = socket.getdefaulttimeout()
    old_hf = os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT")
    socket.setdefaulttimeout(float(os.environ.get("ORCAL_DOWNLOAD_TIMEOUT", "20")))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", os.environ.get("ORCAL_DOWNLOAD_TIMEOUT", "20"))
    try:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=encoder_weights,
                                in_channels=in_channels, classes=out_channels, **kw)
    except KeyError as err:
        if "weights" in str(err).lower() or encoder_weights is not None:
            raise ValueError(f"encoder {encoder!r} has no {encoder_weights!r} weights in "
                             f"segmentation_models_pytorch, or architecture {arch!r} is unknown: {err}") from err
        raise
    except (OSError, RuntimeError, ConnectionError, TimeoutError) as err:
        raise RuntimeError(f"could not fetch the {encoder_weights!r} weights of encoder {encoder!r} ({err}). "
                           "This machine may be offline: pass encoder_weights=None (--encoder-weights none) to "
                           "train from scratch, or place the weights in the cache (TORCH_HOME / HF_HOME) "
                           "first.") from err
    finally:
        socket.setdefaulttimeout(old_timeout)
        if old_hf is None:
            os.environ.pop("HF_HUB_DOWNLOAD_TIMEOUT", None)


def _monai_model(name: str, in_channels: int, out_channels: int, spatial_dims: int, **kw) -> nn.Module:
    try:
        from monai.networks import nets
    except ImportError as err:
        raise ImportError(f"arch='monai:{name}' needs MONAI: pip install monai") from err
    cls = getattr(nets, name, None)
    if cls is None:
        raise ValueError(f"MONAI has no network {name!r} in monai.networks.nets")
    multiple = 32  # enough for MONAI's default encoders; only costs some padding where less is needed
    if name == "UNet":
        kw.setdefault("channels", (16, 32, 64, 128, 256))
        kw.setdefault("strides", (2, 2, 2, 2))
        multiple = math.prod(int(s) if isinstance(s, int) else max(s) for s in kw["strides"])
    net = cls(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kw)
    return PadToMultiple(net, multiple, spatial_dims)


# --- the factory ----------------------------------------------------------------------------------------

def build_model(arch: str = "FPN", encoder: str = "resnet18", in_channels: int = 1, out_channels: int | None = None,
                spatial_dims: int = 2, encoder_weights: str | None = None, head: str | None = None,
                num_raters: int | None = None, num_structures: int = 1, **kw) -> nn.Module:
    """Build a segmentation network.

    Args:
        arch: ``"unet-small"`` (built-in 2D), ``"unet3d"`` (built-in 3D), ``"monai:<Net>"`` (MONAI, 2D/3D),
            or any segmentation_models_pytorch architecture name (2D; ``"FPN"``, ``"Unet"``, ...).
        encoder: segmentation_models_pytorch encoder name (ignored by the built-in and MONAI networks).
        in_channels: image channels.
        out_channels: output channels; by default taken from ``head`` (and ``num_raters``).
        spatial_dims: 2 or 3.
        encoder_weights: ``None`` (random init, the default: nothing is downloaded) or e.g. ``"imagenet"``.
        head: ``"ordinal"`` (``num_raters + 1`` channels) or ``"binary"`` (1 channel); checked against
            ``out_channels`` when both are given.
        num_raters: ``R`` for the ordinal head.
        num_structures: ``C`` structures at once (SPEC §11): ``C`` times the head's channels.
        **kw: passed to the network (``base_channels``, ``depth`` for the built-in U-Nets; smp / MONAI options).

    Returns:
        An ``nn.Module`` mapping ``(B, in_channels, *S)`` to logits ``(B, out_channels, *S)`` for any ``S``.
    """
    if not isinstance(arch, str) or not arch:
        raise TypeError(f"arch must be a non-empty string, got {arch!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if head is not None:
        channels = head_channels(head, num_raters, num_structures)
        if out_channels is not None and out_channels != channels:
            raise ValueError(f"out_channels={out_channels} contradicts head={head!r} with num_raters={num_raters} "
                             f"and num_structures={num_structures} ({channels} channels)")
        out_channels = channels
    if out_channels is None or not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"out_channels must be a positive int (or give head and num_raters), got {out_channels!r}")

    name = arch.lower()
    if name.startswith("monai:"):
        return _monai_model(arch.split(":", 1)[1], in_channels, out_channels, spatial_dims, **kw)
    if name in BUILTIN_2D or name in BUILTIN_3D:
        want = 2 if name in BUILTIN_2D else 3
        if spatial_dims != want:
            raise ValueError(f"arch={arch!r} is a {want}D network, but spatial_dims={spatial_dims}")
        kw.setdefault("base_channels", 8 if want == 2 else 16)
        kw.setdefault("depth", 2 if want == 2 else 3)
        net = UNet(in_channels, out_channels, spatial_dims, **kw)
        return PadToMultiple(net, 2 ** kw["depth"], spatial_dims)
    if spatial_dims == 3:
        raise ValueError(f"arch={arch!r} is not a 3D network; use 'unet3d' or 'monai:<Net>' for 3D")
    net = _smp_model(arch, encoder, in_channels, out_channels, encoder_weights, **kw)
    return PadToMultiple(net, _smp_multiple(net), 2)


def _smp_multiple(net: nn.Module) -> int:
    """The size multiple an smp network needs (its encoder's output stride, 32 for most)."""
    encoder = getattr(net, "encoder", None)
    stride = getattr(encoder, "output_stride", None)
    if isinstance(stride, int) and stride > 0:
        return stride
    depth = getattr(encoder, "_depth", 5)
    return 2 ** int(depth)


# --- readouts -------------------------------------------------------------------------------------------

def probability(model_output: torch.Tensor, head: str, readout: str = "majority",
                majority: int | None = None, num_structures: int | None = None) -> torch.Tensor:
    """Foreground probability ``(B, *S)`` (float32) from a model's output ``(B, C, *S)``.

    ``head="binary"``: the sigmoid of the single logit. ``head="ordinal"``: ``orcal.foreground_probability``
    with ``readout="majority"`` (the probability that at least ``majority`` raters vote foreground, the
    default), ``"expected"`` (the expected fraction of raters voting foreground) or ``"half_tie"`` (a tie of
    ``R/2`` votes counted half), SPEC §2. With
    ``num_structures = C``, ``(B, C, *S)``: one logit or ``R + 1`` levels per structure (SPEC §11).
    """
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if model_output.ndim not in (4, 5):
        raise ValueError(f"model_output must be (B, C, H, W) or (B, C, D, H, W), got {tuple(model_output.shape)}")
    out = model_output.float()
    if num_structures is not None:
        if head == "binary":
            if out.shape[1] != num_structures:
                raise ValueError(f"head='binary' with {num_structures} structures expects as many channels, "
                                 f"got {out.shape[1]}")
            return torch.sigmoid(out)
        from orcal.ops import foreground_probability

        return foreground_probability(out, readout, majority, num_structures=num_structures).float()
    if head == "binary":
        if out.shape[1] != 1:
            raise ValueError(f"head='binary' expects 1 output channel, got {out.shape[1]}")
        return torch.sigmoid(out[:, 0])
    from orcal.ops import foreground_probability

    return foreground_probability(out, readout=readout, majority=majority).float()


def init_output_bias(model: nn.Module, bias: torch.Tensor) -> None:
    """Set the bias of the model's output layer: the last convolution (or transposed convolution, as MONAI's
    UNet ends in) with ``len(bias)`` output channels."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.out_channels == len(bias) and module.bias is not None:
            last = module
    if last is None:
        raise ValueError(f"found no output convolution with {len(bias)} channels and a bias")
    with torch.no_grad():
        last.bias.copy_(bias.to(last.bias))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def as_tuple(size: int | Sequence[int] | None, dims: int, name: str = "patch_size") -> tuple[int, ...] | None:
    """``size`` as a ``dims``-tuple of positive ints (an int, or a sequence of one, is repeated); None stays None."""
    if size is None:
        return None
    out = (int(size),) * dims if isinstance(size, int) else tuple(int(s) for s in size)
    if len(out) == 1:
        out = out * dims
    if len(out) != dims or min(out) < 1:
        raise ValueError(f"{name} must be a positive int or {dims} positive ints, got {size!r}")
    return out
