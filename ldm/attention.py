"""The one attention function: softmax(q k^T / sqrt(d)) v over heads.

torch's scaled_dot_product_attention by default (flash / memory-efficient kernels where the device has
them, a fused kernel on CPU); xformers' memory_efficient_attention when it is installed and the tensors
are on CUDA. xformers is optional and never imported at module load.
"""

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops
    except Exception:  # not installed, or built for another torch/CUDA: fall back to SDPA
        return None
    return xformers.ops


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """q: (B, N, H*D), k and v: (B, M, H*D) -> (B, N, H*D)."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d) for t in (q, k, v))  # (B, N, H, D)
    xops = _xformers_ops() if q.is_cuda else None
    if xops is not None:
        out = xops.memory_efficient_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return out.reshape(b, n, inner)
