"""compiled_mask: analytical Eagle3 TTT block masks, built inside the compiled graph.

Two products in one package. The attention library (this package's modules):

    eagle3_mask_mod(Q_LEN)          the reference mask_mod (the exact semantics)
    eagle3_block_mask(Q_LEN, ...)   the BlockMask, analytically, in O(blocks); eager or compiled
    Eagle3BlockMask                 nn.Module: the static-width BlockMask for a live-round tensor
    Eagle3Attention                 nn.Module: mask + attention, one graph for all TTT steps

and the draft trainer (``compiled_mask.draft``), which imports the library and never the reverse;
its main names are re-exported here, imported on first use:

    Eagle3DraftConfig, Eagle3DraftModel, Eagle3Model, Eagle3Output
"""

import importlib

__all__ = [
    "eagle3_mask_mod",
    "eagle3_block_mask",
    "Eagle3BlockMask",
    "Eagle3Attention",
    "Eagle3DraftConfig",
    "Eagle3DraftModel",
    "Eagle3Model",
    "Eagle3Output",
]

from compiled_mask.block_mask import eagle3_block_mask
from compiled_mask.mask_mod import eagle3_mask_mod
from compiled_mask.modules import Eagle3Attention, Eagle3BlockMask

_DRAFT_NAMES = ("Eagle3DraftConfig", "Eagle3DraftModel", "Eagle3Model", "Eagle3Output")


def __getattr__(name: str):
    # The trainer's names, imported on first use: importing the attention library never imports
    # the trainer (compiled_mask.draft imports the library).
    if name in _DRAFT_NAMES:
        return getattr(importlib.import_module("compiled_mask.draft"), name)
    raise AttributeError(f"module 'compiled_mask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_DRAFT_NAMES])
