"""Pure tensor loss functions: token/sequence log-probabilities and preference/reward losses.

Each function's docstring gives its paper equation; ``tests/losses/`` checks them on hand-computed values
and against TRL on identical inputs.
"""

from alignkit.losses.logprobs import selective_log_softmax, sequence_logps, token_logps
from alignkit.losses.preference import (
    bradley_terry_loss,
    cpo_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    regression_loss,
    simpo_loss,
)

__all__ = [
    "bradley_terry_loss",
    "cpo_loss",
    "dpo_loss",
    "kto_loss",
    "orpo_loss",
    "regression_loss",
    "selective_log_softmax",
    "sequence_logps",
    "simpo_loss",
    "token_logps",
]
