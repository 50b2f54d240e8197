"""Session-wide test rules.

* A machine without a CUDA GPU skips every ``cuda``-marked test with one reason, the same for all of them.
* ``be``: the ``(backend, device)`` of a backend case, one per backend of ``backend_cases.BACKENDS`` (the
  files that use it run their Triton cases in a child process, ``run_triton_cases``).
* A test whose cases ran in a child process (the Triton interpreter needs ``TRITON_INTERPRET=1`` set before
  Triton is imported, see ``test_triton.py``) reports the child's verdict for each case instead of running
  its body again: a case passed, failed or was skipped there, and says so here.
"""

from __future__ import annotations

import pytest
import torch
from backend_cases import BACKENDS

NO_GPU = "no CUDA GPU on this machine: the -m cuda tests run on a GPU machine (benchmarks/gpu_check.sh)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skipif(True, reason=NO_GPU)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(no_gpu, append=False)  # first, so that it is the reason shown


@pytest.fixture(params=BACKENDS)
def be(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A case with a ``child_verdict`` (set by a fixture: ``(outcome, message)``) reports it, body not run."""
    verdict = getattr(pyfuncitem, "child_verdict", None)
    if verdict is None:
        return None
    outcome, message = verdict
    if outcome == "passed":
        return True
    if outcome == "skipped":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)
