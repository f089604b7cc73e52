import os

# Triton kernels run on the CPU through the interpreter; this must be set before triton is imported.
os.environ["TRITON_INTERPRET"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vlfast import defaults  # noqa: E402

# Tiny stand-ins for the default LMs, built once per test session into a cache that in-process runs
# and subprocesses both read through VLFAST_CACHE.


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY_LMS = {
    "source": defaults.LMSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=3, seed=1),
    "target": defaults.LMSpec(hidden_size=48, num_layers=2, num_heads=2, intermediate_size=96, steps=3, seed=2),
}


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vlfast-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLFAST_CACHE", str(root))
        patch.setattr(defaults, "LMS", TINY_LMS)
        defaults.build_all()
    return root


@pytest.fixture
def tiny_defaults(tiny_cache, monkeypatch) -> Path:
    monkeypatch.setenv("VLFAST_CACHE", str(tiny_cache))
    monkeypatch.setattr(defaults, "LMS", TINY_LMS)
    return tiny_cache
