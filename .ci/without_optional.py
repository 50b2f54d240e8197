"""Run pytest as the GPU machine's image would see the tests: without the optional packages.

``python .ci/without_optional.py PYTEST_ARGS...`` makes nibabel, SimpleITK, MONAI, nnU-Net,
segmentation_models_pytorch (and the plotting/image packages the GPU image may lack) unimportable, then runs
pytest. Test modules must ``pytest.importorskip`` what they need, so collection never fails there.
"""

from __future__ import annotations

import sys

BLOCKED = ("nibabel", "SimpleITK", "monai", "nnunetv2", "segmentation_models_pytorch", "PIL", "matplotlib",
           "torchvision", "torchmetrics", "tqdm")


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # the repository root
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    for name in BLOCKED:  # import raises ImportError; importlib.util.find_spec answers None, as for a missing one
        sys.modules[name] = None
    import pytest

    sys.exit(pytest.main(sys.argv[1:]))
