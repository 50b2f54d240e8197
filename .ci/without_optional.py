"""Run pytest as the GPU machine's image would see the tests: without the optional packages.

``python .ci/without_optional.py PYTEST_ARGS...`` makes nibabel, SimpleITK, MONAI, nnU-Net,
segmentation_models_pytorch (and the plotting/image packages the GPU image may lack) unimportable, then runs
pytest. Test modules must ``pytest.importorskip`` what they need, so collection never fails there.
"""

from __future__ import annotations

import importlib.abc
import sys

BLOCKED = ("nibabel", "SimpleITK", "monai", "nnunetv2", "segmentation_models_pytorch", "PIL", "matplotlib",
           "torchvision", "torchmetrics", "tqdm")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (made unimportable by .ci/without_optional.py)")
        return None


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # the repository root
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, _Blocker())
    import pytest

    sys.exit(pytest.main(sys.argv[1:]))
