"""The one-voxel-at-a-time math of csrc/common/ordinal_math.h, which the CUDA kernels run, checked on the CPU.

The header is compiled here into a tiny host-only module, so the CUDA kernels' per-voxel functions are
tested against the reference even on machines without a GPU.
"""

import shutil

import pytest
import torch

from orcal.ops import reference

SOURCE = r"""
#include <torch/extension.h>
#include "common/ordinal_math.h"

// z (V, R+1) float32, k (V,) int64 -> per-voxel loss (V,) and gradient (V, R+1)
std::tuple<at::Tensor, at::Tensor> voxel_loss(at::Tensor z, at::Tensor k, int64_t m, double w) {
  const at::Tensor zc = z.contiguous();
  const at::Tensor kc = k.contiguous();
  const int64_t V = z.size(0), C = z.size(1);
  at::Tensor loss = at::empty({V}, z.options()), grad = at::empty({V, C}, z.options());
  const float* zp = zc.data_ptr<float>();
  const int64_t* kp = kc.data_ptr<int64_t>();
  float* lp = loss.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  for (int64_t v = 0; v < V; ++v) {
    auto load = [&](int c) { return zp[v * C + c]; };
    auto store = [&](int c, float value) { gp[v * C + c] = value; };
    lp[v] = orcal::voxel_loss<float>(load, int(C - 1), int(m), int(kp[v]), float(w), 1.0f, true, store);
  }
  return {loss, grad};
}

at::Tensor voxel_readout(at::Tensor z, int64_t m, int64_t readout) {
  const at::Tensor zc = z.contiguous();
  const int64_t V = z.size(0), C = z.size(1);
  at::Tensor p = at::empty({V}, z.options());
  const float* zp = zc.data_ptr<float>();
  for (int64_t v = 0; v < V; ++v) {
    auto load = [&](int c) { return zp[v * C + c]; };
    p.data_ptr<float>()[v] = orcal::voxel_readout<float>(load, int(C - 1), int(m), int(readout));
  }
  return p;
}
"""


@pytest.fixture(scope="module")
def voxel_math(tmp_path_factory):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    from pathlib import Path

    from torch.utils.cpp_extension import load_inline

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    return load_inline("orcal_voxel_math_check", cpp_sources=[SOURCE], functions=["voxel_loss", "voxel_readout"],
                       extra_include_paths=[str(csrc)], extra_cflags=["-O1", "-std=c++20"],
                       build_directory=str(tmp_path_factory.mktemp("voxel_math")))


def as_volume(z):
    """(V, R+1) per-voxel logits -> (1, R+1, 1, V), the reference's layout."""
    return z.t().reshape(1, z.shape[1], 1, z.shape[0]).double()


@pytest.mark.parametrize("R", [1, 2, 3, 7, 8, 32])
def test_cuda_voxel_loss_and_gradient_match_the_reference(voxel_math, R):
    g = torch.Generator().manual_seed(R)
    for scale in (1.0, 10.0, 1e4):
        z = torch.randn(150, R + 1, generator=g) * scale
        k = torch.randint(0, R + 1, (150,), generator=g)
        for m in sorted({1, R // 2 + 1, R}):
            loss, grad = voxel_math.voxel_loss(z, k, m, 0.7)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            kk = k.reshape(1, 1, -1)
            ref = reference.ordinal_loss(as_volume(z), kk, 0.7, m, reduction="none").reshape(-1)
            ref_grad = reference.ordinal_loss_grad(as_volume(z), kk, 0.7, m, reduction="none")
            torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad.double(), ref_grad.reshape(R + 1, -1).t(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("readout", ["majority", "expected"])
def test_cuda_voxel_readout_matches_the_reference(voxel_math, readout):
    z = torch.randn(200, 6, generator=torch.Generator().manual_seed(1)) * 5
    for m in (1, 3, 5):
        p = voxel_math.voxel_readout(z, m, 0 if readout == "majority" else 1)
        ref = reference.foreground_probability(as_volume(z), readout, m).reshape(-1)
        torch.testing.assert_close(p.double(), ref, rtol=1e-5, atol=1e-6)
