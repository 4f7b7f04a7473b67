"""A ViT's last block computed for the class token alone, when nothing reads its other outputs.

The teacher's final output feeds S_E's target, and S_E's final output its prediction; both are the
class token unless `model.encoder.distill_patch_mean` asks for the mean patch token as well. The
last block then needs every token's key and value, but the query, attention output and MLP of the
class token only: the same numbers (up to the order of floating-point sums) for the cost of the key
and value projections, under a sixth of the block's work. Any block that is not timm's plain pre-norm
`Block` runs whole.

The class token's own products run one image at a time (a batched product of one row each): a plain
matrix product over the batch's B rows picks its kernel by B, and an image's score would then move
(by about 1e-5) with the size of the batch it came in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import nn


def supports_class_token_only(block: nn.Module) -> bool:
    """timm's standard block, attention (ungated) and MLP: the only form whose maths is reproduced here."""
    return (type(block) is Block and type(block.attn) is Attention and block.attn.gate is None
            and type(block.mlp) is Mlp and type(block.mlp.fc1) is nn.Linear and type(block.mlp.fc2) is nn.Linear)


def _per_image(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for one token per image, (B, 1, C) -> (B, 1, D), each image's row
    computed alone, so that its numbers do not depend on B."""
    y = torch.bmm(x, weight.t().expand(x.shape[0], -1, -1))
    return y if bias is None else y + bias  # not baddbmm: OpenVINO's converter cannot broadcast its bias


def class_token_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)[:, :1]` for a block that `supports_class_token_only`: (B, T, C) -> (B, 1, C)."""
    attn = block.attn
    h = block.norm1(x)
    d = attn.attn_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    q = _per_image(h[:, :1], w[:d], None if b is None else b[:d])  # the class token's query only
    kv = F.linear(h, w[d:], None if b is None else b[d:])  # every token's key and value
    batch, tokens = x.shape[:2]
    q = q.reshape(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(batch, tokens, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, 1, d))
    out = attn.proj_drop(_per_image(out, attn.proj.weight, attn.proj.bias))
    y = x[:, :1] + block.drop_path1(block.ls1(out))
    mlp = block.mlp
    h = mlp.norm(mlp.drop1(mlp.act(_per_image(block.norm2(y), mlp.fc1.weight, mlp.fc1.bias))))
    return y + block.drop_path2(block.ls2(mlp.drop2(_per_image(h, mlp.fc2.weight, mlp.fc2.bias))))


def final_class_token(blocks: nn.Sequential, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The normalised class token after `blocks` (B, C), the last block for the class token only
    where it allows that."""
    last = blocks[-1]
    if not supports_class_token_only(last):
        return norm(blocks(x))[:, 0]
    for blk in blocks[:-1]:
        x = blk(x)
    return norm(class_token_block(last, x))[:, 0]
