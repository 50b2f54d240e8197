// The Python module orcal._C: importing it loads the op registrations above; build_info() says what
// this binary contains. Kept apart from orcal.cpp so the CMake build for libtorch needs no Python.
#include <torch/extension.h>

#include <string>

#ifndef ORCAL_VERSION
#define ORCAL_VERSION "unknown"
#endif

static pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = ORCAL_VERSION;
#ifdef ORCAL_WITH_CUDA
  info["cuda"] = true;
#ifdef ORCAL_CUDA_ARCHS
  info["cuda_archs"] = ORCAL_CUDA_ARCHS;
#endif
#else
  info["cuda"] = false;
#endif
  info["built_with_torch"] = TORCH_VERSION;
  info["openmp"] =
#ifdef _OPENMP
      true;
#else
      false;
#endif
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "orcal compiled kernels (ops are registered under torch.ops.orcal)";
  m.def("build_info", &build_info, "What this binary was built with");
}
