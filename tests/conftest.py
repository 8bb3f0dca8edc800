"""Test setup: Triton kernels run through the interpreter on the CPU.

TRITON_INTERPRET must be set before any kernel module is imported (``triton.jit`` reads it
when the kernel is defined), so it is set here, before the tests import growkit. Set
``GROWKIT_TEST_NO_INTERPRET=1`` to run the suite on the torch paths alone.
"""

import os

if os.environ.get("GROWKIT_TEST_NO_INTERPRET", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int16, torch.int32, torch.int64):
        t.fill_(-12345)
    return t


@pytest.fixture
def poison_empty(monkeypatch):
    """NaN-fill every buffer made with torch.empty / empty_like during the test.

    A kernel that leaves an output element unwritten then fails its comparison instead of
    passing on whatever the allocator happened to return.
    """
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poisoned(_real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poisoned(_real_empty_like(*a, **k)))
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselected by pytest.ini; CI runs it with -m slow)")
