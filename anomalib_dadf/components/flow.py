"""Discriminative flow: a 2-D normalizing flow over [prior, local, global] at one scale."""

from collections.abc import Callable, Iterable

import torch
from anomalib.models.components.flow import AllInOneBlock
from anomalib.models.image.fastflow.torch_model import subnet_conv_func
from FrEIA.framework import SequenceINN
from timm.layers import build_sincos2d_pos_embed
from torch import nn


def depthwise_subnet(kernel_size: int, hidden_ratio: int) -> Callable[[int, int], nn.Module]:
    """Coupling subnet constructor: depthwise conv, LeakyReLU(0.1), pointwise conv.

    Args:
        kernel_size: Kernel of the depthwise convolution (3 or 1 in DADF, alternating by step).
        hidden_ratio: Depthwise channel multiplier.

    Returns:
        Callable[[int, int], nn.Module]: ``f(in_channels, out_channels)`` as FrEIA expects.
    """

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden_channels = in_channels * hidden_ratio
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=kernel_size // 2, groups=in_channels),
            nn.LeakyReLU(0.1),
            nn.Conv2d(hidden_channels, out_channels, 1),
        )

    return build


# "depthwise" is DADF's; "conv" is FastFlow's full-convolution subnet, a capacity option for tuning.
SUBNETS: dict[str, Callable[[int, int], Callable[[int, int], nn.Module]]] = {
    "depthwise": depthwise_subnet,
    "conv": subnet_conv_func,
}


def check_position_channels(channels: int) -> None:
    """Refuse a width of positional encoding that timm's 2-D sin-cos encoding cannot build.

    Raises:
        ValueError: ``channels`` is negative or not a multiple of 4.
    """
    if channels < 0 or channels % 4:
        msg = (
            f"flow_positions must be 0 (no positional condition) or a positive multiple of 4 (a sine and a cosine "
            f"per axis and frequency), got {channels}."
        )
        raise ValueError(msg)


class PositionalFlow(SequenceINN):
    """A ``SequenceINN`` of ``AllInOneBlock`` couplings whose subnets may also see where each position lies.

    The prior is frozen and its grid fixed, so a position's normal appearance depends on where it is on an
    aligned part (a cell's busbars and corners, an object's layout): with ``position_channels``, every coupling's
    subnet reads a fixed 2-D sin-cos encoding of the position beside its input, as CFLOW conditions its flows.
    The condition is a buffer, not an input, so callers run the flow as any ``SequenceINN``. Without it, this is
    the flow DADF and FastFlow build.

    Args:
        shape: ``(channels, height, width)`` of the flow's input.
        flow_steps: Number of couplings.
        subnet: ``subnet(step)`` gives step ``step``'s subnet constructor, ``f(in_channels, out_channels)``.
        clamp: Affine clamping of the couplings.
        position_channels: Width of the positional encoding; 0 for none.

    Example:
        >>> flow = PositionalFlow((4, 3, 3), 2, lambda step: subnet_conv_func(3, 1.0), position_channels=8)
        >>> latent, log_jacobian = flow(torch.randn(2, 4, 3, 3))
        >>> latent.shape, log_jacobian.shape
        (torch.Size([2, 4, 3, 3]), torch.Size([2]))
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        flow_steps: int,
        subnet: Callable[[int], Callable[[int, int], nn.Module]],
        clamp: float = 2.0,
        position_channels: int = 0,
    ) -> None:
        check_position_channels(position_channels)
        channels, height, width = shape
        super().__init__(channels, height, width)
        condition = {"cond": 0, "cond_shape": (position_channels, height, width)} if position_channels else {}
        for step in range(flow_steps):
            self.append(AllInOneBlock, subnet_constructor=subnet(step), affine_clamping=clamp, permute_soft=False, **condition)
        positions = None
        if position_channels:
            encoding = build_sincos2d_pos_embed([height, width], position_channels)
            positions = encoding.reshape(height, width, position_channels).permute(2, 0, 1).unsqueeze(0)
        # Not saved: rebuilt from the shape, so checkpoints from before the option load unchanged.
        self.register_buffer("positions", positions, persistent=False)

    def forward(
        self,
        x_or_z: torch.Tensor,
        c: Iterable[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``SequenceINN``'s pass, conditioned on the positions when the flow has them."""
        if c is None and self.positions is not None:
            c = [self.positions.expand(x_or_z.shape[0], -1, -1, -1)]
        return super().forward(x_or_z, c=c, rev=rev, jac=jac)


def flow_with_log_jacobian_map(flow: SequenceINN, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a flow of ``AllInOneBlock`` steps and give the log-determinant of its Jacobian at every position.

    The blocks return the log-determinant summed over positions. Each affine coupling scales the position
    ``(h, w)`` of its active half by ``exp(clamp * tanh(0.1 * a))`` with ``a`` its subnet's output there, and
    the block's global scale is the same at every position, so the sum splits into one term per position;
    the subnets' outputs are read with forward hooks, removed again before this returns.

    Args:
        flow: FrEIA ``SequenceINN`` of anomalib's ``AllInOneBlock`` (DADF's and FastFlow's flows).
        features: Its input, ``(B, C, H, W)``.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: The latent ``(B, C, H, W)`` and the log-determinant per position
        ``(B, H, W)``, whose sum over positions is the flow's own log-determinant.

    Example:
        >>> flow = DiscriminativeFlow((4, 3, 3), num_views=1, flow_steps=2).flow
        >>> features = torch.randn(2, 4, 3, 3)
        >>> latent, log_jacobian_map = flow_with_log_jacobian_map(flow, features)
        >>> torch.allclose(log_jacobian_map.sum(dim=(1, 2)), flow(features)[1], atol=1e-5)
        True
    """
    log_jacobian_maps: list[torch.Tensor] = []

    def record(block: AllInOneBlock) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_subnet: nn.Module, _inputs: object, coefficients: torch.Tensor) -> None:
            # Read before the block scales the coefficients in place (AllInOneBlock._affine).
            log_scales = block.clamp * torch.tanh(0.1 * coefficients[:, : coefficients.shape[1] // 2])
            global_scale = torch.log(block.global_scale_activation(block.global_scale)).sum()
            log_jacobian_maps.append(log_scales.sum(dim=1) + global_scale)

        return hook

    handles = [block.subnet.register_forward_hook(record(block)) for block in flow.module_list]
    try:
        latent, _ = flow(features)
    finally:
        for handle in handles:
            handle.remove()
    return latent, torch.stack(log_jacobian_maps).sum(dim=0)


class DiscriminativeFlow(nn.Module):
    """LayerNorm over the concatenated views followed by ``AllInOneBlock`` steps in a FrEIA ``SequenceINN``.

    The block is anomalib's port of FrEIA's ``AllInOneBlock`` (same maths, a FrEIA
    ``InvertibleModule``): FrEIA's own keeps a lambda, which ``torch.save`` cannot pickle, so a
    model built with it could not be exported to Torch.

    Args:
        feature_shape: ``(channels, height, width)`` of the prior at this scale.
        num_views: How many views of that shape are concatenated (3 in DADF: prior, local, global).
        flow_steps: Number of coupling steps; the subnets' kernel alternates 3x3 and 1x1.
        clamp: Affine clamping of the couplings.
        hidden_ratio: Channel multiplier of the coupling subnets' hidden layer.
        subnet: ``"depthwise"`` (DADF's: depthwise conv, pointwise conv) or ``"conv"`` (FastFlow's:
            two full convolutions of the step's kernel size).

    Raises:
        ValueError: Unknown subnet.
    """

    def __init__(
        self,
        feature_shape: tuple[int, int, int],
        num_views: int = 3,
        flow_steps: int = 8,
        clamp: float = 2.0,
        hidden_ratio: int = 1,
        subnet: str = "depthwise",
        position_channels: int = 0,
    ) -> None:
        super().__init__()
        if subnet not in SUBNETS:
            msg = f"Unknown flow subnet '{subnet}': choose one of {list(SUBNETS)}."
            raise ValueError(msg)
        channels, height, width = feature_shape
        flow_shape = (num_views * channels, height, width)
        self.norm = nn.LayerNorm(list(flow_shape))
        self.flow = PositionalFlow(
            flow_shape,
            flow_steps,
            lambda step: SUBNETS[subnet](3 if step % 2 == 0 else 1, hidden_ratio),
            clamp=clamp,
            position_channels=position_channels,
        )

    def forward(self, *views: torch.Tensor, per_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Map the views of one scale (in DADF: prior, local, global) to the latent space.

        Args:
            views: The views, ``(B, C, H, W)`` each.
            per_position: Give the flow's log-determinant per position rather than per image.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: Latent ``z`` with shape ``(B, num_views * C, H, W)``
            and the log-determinant of the flow's Jacobian (not the norm's), shape ``(B,)``, or ``(B, H, W)``
            with ``per_position``.
        """
        features = self.norm(torch.cat(views, dim=1))
        return flow_with_log_jacobian_map(self.flow, features) if per_position else self.flow(features)
