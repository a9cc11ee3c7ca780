"""DADF's two training objectives.

Stage 1 trains the Transformer to reconstruct the prior both ways; stage 2 trains the flows by
maximum likelihood. The flow objective (mean over images of ``0.5 * sum(z^2) - log|det J|``,
summed over scales) is exactly FastFlow's, so anomalib's implementation is reused.
"""

from collections.abc import Sequence

import torch
from anomalib.models.image.fastflow.loss import FastflowLoss as FlowLoss
from torch import nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["FlowLoss", "ReconstructionLoss"]


class ReconstructionLoss(nn.Module):
    """Mean squared error of the local and the global reconstruction, summed over scales."""

    @staticmethod
    def forward(
        priors: Sequence[torch.Tensor],
        local: Sequence[torch.Tensor],
        global_: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Compute the stage-1 loss.

        Args:
            priors: Backbone feature maps, the targets.
            local: Local (self-attention) reconstructions, same shapes.
            global_: Global (memorial-attention) reconstructions, same shapes.

        Returns:
            torch.Tensor: Scalar loss.
        """
        return sum(
            (
                F.mse_loss(local_map, prior) + F.mse_loss(global_map, prior)
                for prior, local_map, global_map in zip(priors, local, global_, strict=True)
            ),
            start=torch.zeros((), device=priors[0].device),
        )
