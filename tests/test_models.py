"""Network factory shapes for both heads in 2D and 3D, readouts, and clear errors."""

from __future__ import annotations

import pytest
import torch

import orcal
from orcal import models
from orcal.models import build_model, head_channels, init_output_bias, probability


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("head,channels", [("ordinal", 6), ("binary", 1)])
def test_fpn_resnet18_shapes(head, channels):
    pytest.importorskip("segmentation_models_pytorch")
    model = build_model("FPN", "resnet18", in_channels=1, head=head, num_raters=5, encoder_weights=None).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, channels, 64, 64)
        assert model(torch.randn(1, 1, 37, 50)).shape == (1, channels, 37, 50)  # any size: padded and cropped


@pytest.mark.parametrize("head,channels", [("ordinal", 4), ("binary", 1)])
def test_unet3d_shapes(head, channels):
    model = build_model("unet3d", in_channels=2, spatial_dims=3, head=head, num_raters=3, base_channels=4, depth=2)
    assert model(torch.randn(1, 2, 8, 12, 9)).shape == (1, channels, 8, 12, 9)


def test_unet_small_any_size_and_channels():
    model = build_model("unet-small", in_channels=3, out_channels=2)
    assert model(torch.randn(3, 3, 17, 16)).shape == (3, 2, 17, 16)
    assert models.count_parameters(model) < 100_000


def test_head_channels():
    assert head_channels("ordinal", 7) == 8 and head_channels("binary") == 1
    with pytest.raises(ValueError, match="num_raters"):
        head_channels("ordinal")
    with pytest.raises(ValueError, match="head"):
        head_channels("soft", 3)
    with pytest.raises(ValueError, match="contradicts"):
        build_model("unet-small", out_channels=3, head="ordinal", num_raters=3)


def test_probability_readouts():
    logits = torch.randn(2, 4, 5, 6)
    for readout in ("majority", "expected"):
        p = probability(logits, "ordinal", readout=readout)
        assert p.shape == (2, 5, 6) and p.dtype == torch.float32
        assert torch.allclose(p, orcal.foreground_probability(logits, readout=readout))
    q = torch.softmax(logits, 1)
    assert torch.allclose(probability(logits, "ordinal", majority=1), 1 - q[:, 0], atol=1e-6)
    assert torch.allclose(probability(logits, "ordinal", readout="expected"),
                          (q * torch.arange(4.0).view(1, 4, 1, 1)).sum(1) / 3, atol=1e-6)
    binary = torch.randn(2, 1, 3, 4, 5)
    assert torch.equal(probability(binary, "binary"), torch.sigmoid(binary[:, 0]))
    with pytest.raises(ValueError, match="1 output channel"):
        probability(logits, "binary")
    with pytest.raises(ValueError, match="head"):
        probability(logits, "soft")


def test_bad_arguments():
    with pytest.raises(ValueError, match="3D network"):
        build_model("unet3d", out_channels=2, spatial_dims=2)
    with pytest.raises(ValueError, match="not a 3D network"):
        build_model("FPN", out_channels=2, spatial_dims=3)
    with pytest.raises(ValueError, match="spatial_dims"):
        build_model("unet-small", out_channels=2, spatial_dims=4)
    with pytest.raises(ValueError, match="out_channels"):
        build_model("unet-small")
    pytest.importorskip("segmentation_models_pytorch")
    with pytest.raises(ValueError, match="architecture"):
        build_model("NoSuchNet", out_channels=2)
    with pytest.raises(ValueError, match="encoder"):
        build_model("FPN", encoder="no-such-encoder", out_channels=2)


def test_monai_missing_is_a_clear_error():
    try:
        import monai  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install monai"):
            build_model("monai:UNet", out_channels=2, spatial_dims=3)
    else:
        model = build_model("monai:UNet", out_channels=2, spatial_dims=3)
        # four stride-2 levels: 32 voxels a side leave 2 at the bottleneck, which instance norm needs in training
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
        ordinal = build_model("monai:UNet", out_channels=4, spatial_dims=3)  # ends in a ConvTranspose3d
        init_output_bias(ordinal, torch.tensor([1.0, 2.0, 3.0, 4.0]))
        out = [m for m in ordinal.modules() if isinstance(m, torch.nn.modules.conv._ConvNd) and m.out_channels == 4]
        assert torch.equal(out[-1].bias.detach(), torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_pretrained_weights_offline_fail_clearly(monkeypatch):
    smp = pytest.importorskip("segmentation_models_pytorch")

    def offline(*args, **kwargs):
        if kwargs.get("encoder_weights") is not None:
            raise OSError("Name or service not known")
        raise AssertionError("only the download path is expected here")

    monkeypatch.setattr(smp, "create_model", offline)
    with pytest.raises(RuntimeError, match="encoder_weights=None"):
        build_model("FPN", "resnet18", out_channels=2, encoder_weights="imagenet")


def test_smp_missing_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_smp(name, *args, **kwargs):
        if name.startswith("segmentation_models_pytorch"):
            raise ImportError("No module named 'segmentation_models_pytorch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_smp)
    with pytest.raises(ImportError, match=r"orcal\[models\]"):
        build_model("FPN", out_channels=2)
    assert build_model("unet-small", out_channels=2) is not None  # the built-in nets need nothing else


@pytest.mark.parametrize("name, options", [
    ("monai:UNet", {}),
    ("monai:SegResNet", {}),
    ("monai:DynUNet", {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2]}),
])
def test_output_bias_of_monai_networks(name, options):
    pytest.importorskip("monai")
    model = build_model(name, out_channels=4, spatial_dims=3, **options)
    bias = torch.tensor([1.0, 2.0, 3.0, 4.0])
    init_output_bias(model, bias)
    out = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd) and m.out_channels == 4]
    assert torch.equal(out[-1].bias.detach(), bias)
    model.eval()
    with torch.no_grad():  # 32 a side: monai:UNet's four stride-2 levels need 2 voxels at the bottleneck
        y = model(torch.randn(1, 1, 32, 32, 32))
    assert y.shape == (1, 4, 32, 32, 32)
