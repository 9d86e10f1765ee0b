"""The Eagle3 draft trainer: the draft model, its TTT training unroll and its loss, built on the
attention library (``compiled_mask``), which never imports it.

    Eagle3DraftConfig, Eagle3DraftModel   the draft (model.py), with SpecForge's/TorchSpec's names
    Eagle3Model, Eagle3Output             the TTT unroll, losses and accuracies (unroll.py)
    TargetLogits, TargetHead, head_loss   compact target forms and the fused LM head + loss (loss.py)
    ContextParallel                       the unroll over a process group (context_parallel.py)
"""

__all__ = [
    "ContextParallel",
    "Eagle3DraftConfig",
    "Eagle3DraftModel",
    "Eagle3Model",
    "Eagle3Output",
    "MEMORY_POLICIES",
    "TargetHead",
    "TargetLogits",
    "head_loss",
]

from compiled_mask.draft.context_parallel import ContextParallel
from compiled_mask.draft.loss import TargetHead, TargetLogits, head_loss
from compiled_mask.draft.model import Eagle3DraftConfig, Eagle3DraftModel
from compiled_mask.draft.unroll import MEMORY_POLICIES, Eagle3Model, Eagle3Output
