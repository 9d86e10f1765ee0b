"""The Eagle3 draft trainer: the draft model and its TTT training unroll, built on the attention
library (``compiled_mask``), which never imports it.

    Eagle3DraftConfig, Eagle3DraftModel   the draft (model.py), with SpecForge's/TorchSpec's names
    Eagle3Model, Eagle3Output             the TTT unroll, losses and accuracies (unroll.py)
"""

__all__ = ["Eagle3DraftConfig", "Eagle3DraftModel", "Eagle3Model", "Eagle3Output"]

from compiled_mask.draft.model import Eagle3DraftConfig, Eagle3DraftModel
from compiled_mask.draft.unroll import Eagle3Model, Eagle3Output
