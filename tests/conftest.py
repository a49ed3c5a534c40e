"""Shared fixtures."""
import pytest
import torch

# Tests that train: one torch thread each (two threads on a busy 2-core box slow small steps ~100x).
_ONE_THREAD = {"test_engine", "test_cli", "test_methods"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(request):
    if request.module.__name__.rsplit(".", 1)[-1] not in _ONE_THREAD:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
