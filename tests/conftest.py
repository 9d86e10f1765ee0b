import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` where there is no CUDA device (checked at run time, not import)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
