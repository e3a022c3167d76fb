"""Sparse kernels of the SAE step: decode and encoder gradients over the picked entries only.

Training never builds the dense ``[tokens, n_latents]`` code: the picked activations, the decoder
and every gradient touch only the ``tokens x k`` selected entries (segment sums via
``embedding_bag``). Kept apart from :mod:`mmie.sae.modules` so the modules read as the maths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def segment_sum(group: Tensor, gather: Tensor, weights: Tensor, table: Tensor,
                n_groups: int) -> Tensor:
    """``out[g] = sum(weights[e] * table[gather[e]] for e with group[e] == g)``, ``[n_groups, d]``.

    ``embedding_bag`` reads the gathered rows without materialising ``[entries, d]``; it is the
    sparse decoder (its own backward is sparse too) and the sparse encoder-weight gradient.
    Measured on CPU it matches or beats gathering rows and a ``bmm`` (see bench/bench_sae.py).
    """
    order = group.argsort()
    counts = torch.bincount(group, minlength=n_groups)
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(gather[order], table, offsets, mode="sum",
                           per_sample_weights=weights[order].to(table.dtype))


class SparseEncode(torch.autograd.Function):
    """Gather ``pre[tok, col]`` (ReLU'd pre-activations) with gradients for the picked entries."""

    @staticmethod
    def forward(ctx, pre, tok, col, x, b_dec, w_enc, b_enc):
        out = pre[tok, col]
        ctx.save_for_backward(tok, col, x, b_dec, w_enc, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        tok, col, x, b_dec, w_enc, out = ctx.saved_tensors
        n_latents = w_enc.shape[1]
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.to(w_enc.dtype) * (out > 0)
            g_b_enc = torch.zeros(n_latents, dtype=g.dtype, device=g.device).index_add_(0, col, g)
            g_w_enc = segment_sum(col, tok, g, x.to(w_enc.dtype) - b_dec, n_latents).t()
            g_x = None
            if ctx.needs_input_grad[3]:
                g_x = segment_sum(tok, col, g, w_enc.t().contiguous(), x.shape[0])
            # sum over tokens of dL/d(x - b_dec) is W_enc @ g_b_enc: no [tokens, d] needed.
            g_b_dec = -g_x.sum(0) if g_x is not None else -(w_enc @ g_b_enc)
        return None, None, None, g_x, g_b_dec, g_w_enc, g_b_enc


def token_ids(idx: Tensor) -> Tensor:
    return torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
