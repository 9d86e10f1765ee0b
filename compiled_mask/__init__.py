"""compiled_mask: analytical Eagle3 TTT block masks, built inside the compiled graph.

Public API:
    eagle3_mask_mod(Q_LEN)          the reference mask_mod (the exact semantics)
    eagle3_block_mask(Q_LEN, ...)   the BlockMask, analytically, in O(blocks); eager or compiled
    Eagle3BlockMask                 nn.Module: the static-width BlockMask for a live-round tensor
    Eagle3Attention                 nn.Module: mask + attention, one graph for all TTT steps
    Eagle3DraftConfig, Eagle3DraftModel, Eagle3Model, Eagle3Output
                                    an Eagle3 draft and its TTT training unroll (draft.py)
"""

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
from compiled_mask.draft import Eagle3DraftConfig, Eagle3DraftModel, Eagle3Model, Eagle3Output
from compiled_mask.mask_mod import eagle3_mask_mod
from compiled_mask.modules import Eagle3Attention, Eagle3BlockMask
