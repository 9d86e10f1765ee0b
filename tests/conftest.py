import pytest
import torch
import torch._dynamo
import torch._inductor.utils
from hypothesis import Phase, settings


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` where there is no CUDA device (checked at run time, not import)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_compile_state():
    """A reset dynamo and a fresh Inductor cache directory, for tests that count graphs or
    compile with settings of their own (DESIGN.md: an old cache entry can hide a recompile)."""
    torch._dynamo.reset()
    with torch._inductor.utils.fresh_cache():
        yield
    torch._dynamo.reset()


@pytest.fixture
def fa4_installed(monkeypatch):
    """Pretend flash_attn.cute is importable (to reach the checks behind that one)."""
    from compiled_mask import _fa4

    monkeypatch.setattr(_fa4, "fa4_available", lambda: True)


# Hypothesis: "ci" (the default) prints the reproduction blob of a failure (add the printed
# @reproduce_failure(...) to the test to replay it) and the seed; "dev" skips shrinking, for a
# quick first look at a failure: pytest --hypothesis-profile=dev.
settings.register_profile("ci", print_blob=True, deadline=None)
settings.register_profile("dev", print_blob=True, deadline=None, phases=[Phase.explicit, Phase.generate])
settings.load_profile("ci")
