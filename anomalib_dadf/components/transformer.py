"""Dual-attention Transformer: local (self-attention) and global (memorial attention) reconstruction.

Two token streams pass through the same blocks. The image's tokens use ordinary self-attention and
give the *local* reconstruction. Learnable memory tokens query the image's keys but read the
memory's own values, so their output can only mix learned normal content: the *global*
reconstruction, through which an anomaly cannot be copied.
"""

from collections.abc import Sequence

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed, trunc_normal_
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F  # noqa: N812


class DualAttention(Attention):
    """timm's multi-head attention, applied to an image stream and a memory stream at once.

    Both streams share the ``qkv`` and ``proj`` weights. The image stream attends to itself; the
    memory stream's queries attend to the image's keys and gather the memory's own values.
    """

    def _split_heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        return self.q_norm(query), self.k_norm(key), value

    def _merge_heads(self, heads: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = heads.shape
        return self.proj_drop(self.proj(self.norm(heads.transpose(1, 2).reshape(batch, length, self.attn_dim))))

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """Attend both streams.

        Args:
            tokens: Image tokens, shape ``(B, N, D)``.
            memory: Memory tokens, shape ``(B, N, D)``.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: Self-attention output and memorial-attention output.
        """
        query, key, value = self._split_heads(tokens)
        memory_query, _, memory_value = self._split_heads(memory)
        dropout = self.attn_drop.p if self.training else 0.0
        local = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        memorial = F.scaled_dot_product_attention(memory_query, key, memory_value, dropout_p=dropout)
        return self._merge_heads(local), self._merge_heads(memorial)


class DualAttentionBlock(Block):
    """timm's pre-norm Transformer block with :class:`DualAttention`, shared by both streams."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, attn_layer=DualAttention)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """Update the image stream and the memory stream with shared weights."""
        local, memorial = self.attn(self.norm1(tokens), self.norm1(memory))
        tokens = tokens + self.drop_path1(self.ls1(local))
        memory = memory + self.drop_path1(self.ls1(memorial))
        tokens = tokens + self.drop_path2(self.ls2(self.mlp(self.norm2(tokens))))
        memory = memory + self.drop_path2(self.ls2(self.mlp(self.norm2(memory))))
        return tokens, memory


def _xavier_init(module: nn.Module) -> None:
    """The reference implementation's initialisation: xavier-uniform weights and zero biases.

    It covers every linear layer and the patch embeddings' convolutions (as matrices of
    ``out x (in * k * k)``, like a linear layer on flattened patches); norms keep PyTorch's ones and zeros.
    """
    if isinstance(module, nn.Linear | nn.Conv2d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DualAttentionTransformer(nn.Module):
    """Reconstructs multi-scale prior features locally and globally on a common token grid.

    Args:
        channels: Channels of each prior scale, finest first.
        patch_sizes: Patch size that maps each scale onto the token grid.
        grid_size: Token grid ``(height, width)``.
        embed_dim: Width of each scale's patch embedding; tokens are ``len(channels) * embed_dim`` wide.
        depth: Number of dual-attention blocks.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the blocks' MLPs relative to the token width.
    """

    def __init__(
        self,
        channels: Sequence[int],
        patch_sizes: Sequence[int],
        grid_size: tuple[int, int],
        embed_dim: int = 480,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        width = embed_dim * len(channels)
        if width % num_heads:
            msg = (
                f"Token width {width} (= {len(channels)} scales x embed_dim {embed_dim}) is not divisible by "
                f"num_heads {num_heads}: pick num_heads that divides it, or another embed_dim."
            )
            raise ValueError(msg)
        self.grid_size = grid_size
        self.patch_sizes = tuple(patch_sizes)
        self.patch_embeds = nn.ModuleList(
            PatchEmbed(
                img_size=(grid_size[0] * patch, grid_size[1] * patch),
                patch_size=patch,
                in_chans=channel,
                embed_dim=embed_dim,
            )
            for channel, patch in zip(channels, patch_sizes, strict=True)
        )
        # Fixed positions are recomputed, never learned, so they stay out of checkpoints.
        self.register_buffer("pos_embed", build_sincos2d_pos_embed(list(grid_size), width).unsqueeze(0), persistent=False)
        self.memory = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], width))
        trunc_normal_(self.memory, std=0.02)
        self.blocks = nn.ModuleList(DualAttentionBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleList(
            nn.Linear(width, patch * patch * channel) for channel, patch in zip(channels, patch_sizes, strict=True)
        )
        self.apply(_xavier_init)

    def forward(self, priors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Reconstruct every prior scale twice.

        Args:
            priors: Feature maps, finest first, each ``(B, C_i, H_i, W_i)``.

        Returns:
            tuple[list[torch.Tensor], list[torch.Tensor]]: Local and global reconstructions, each with
            the priors' shapes.
        """
        tokens = torch.cat([embed(prior) for embed, prior in zip(self.patch_embeds, priors, strict=True)], dim=-1)
        tokens = tokens + self.pos_embed
        memory = (self.memory + self.pos_embed).expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            tokens, memory = block(tokens, memory)
        return self._unpatchify(self.norm(tokens)), self._unpatchify(self.norm(memory))

    def _unpatchify(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        grid_h, grid_w = self.grid_size
        maps = []
        for head, patch in zip(self.heads, self.patch_sizes, strict=True):
            patches = head(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w)
            maps.append(F.pixel_shuffle(patches, patch))
        return maps
