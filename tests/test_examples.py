"""The ``Example::`` blocks of the public docstrings run as written (doctest)."""

from __future__ import annotations

import doctest
import inspect

import pytest
import torch

import compiled_mask
from compiled_mask import block_mask, mask_mod, modules

MODULES = [mask_mod, block_mask, modules]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0


def test_every_public_function_and_module_has_an_example():
    """(Configs and result tuples excepted: they are shown in the examples that use them.)"""
    for name in compiled_mask.__all__:
        obj = getattr(compiled_mask, name)
        if inspect.isfunction(obj) or (inspect.isclass(obj) and issubclass(obj, torch.nn.Module)):
            assert "Example::" in (obj.__doc__ or ""), name
