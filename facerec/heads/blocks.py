"""Row blocks for the passes over an (N, m) matrix of cosines (the loss, its diagnostics, the dynamic s)."""
from __future__ import annotations

import torch

CPU_BLOCK_ELEMENTS = 2**17  # 512 KB of float32: a block's temporaries stay in cache
DEVICE_ROW_BLOCKS = 8


def row_block(num_rows: int, num_columns: int, device: torch.device) -> int:
    """Rows per block for the loops over a (num_rows, num_columns) matrix.

    On the CPU ~2^17 elements, whose temporaries stay in cache (one whole-matrix temporary made those
    passes ~2x slower). On a GPU launches, not bandwidth, bound such a loop, so it runs in a fixed
    number of blocks, DEVICE_ROW_BLOCKS: the op count does not grow with C, and a block's temporaries
    (the statistics' copy of the cosines) stay within 1/8 of the (N, m) matrix the loss already holds.
    """
    if device.type == "cpu":
        return max(1, CPU_BLOCK_ELEMENTS // max(1, num_columns))
    return max(1, -(-num_rows // DEVICE_ROW_BLOCKS))


def pass_block(num_rows: int, num_columns: int, device: torch.device) -> int:
    """Rows per block for the loss's own passes over its (N, m) buffer (margin, scale and
    exponentials in forward, the logits' gradient in backward), which make no block-sized copies of
    the matrix: cache-sized blocks on the CPU, as `row_block`; on a GPU one block, the whole matrix,
    so each op of a pass is one launch."""
    if device.type == "cpu":
        return row_block(num_rows, num_columns, device)
    return max(1, num_rows)


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) dot products of the rows of two (n, d) blocks. On the CPU a product and a sum (the block
    stays in cache; bmm over n (1, d) x (d, 1) products took 4x as long); elsewhere one bmm, which
    needs no (n, d) temporary."""
    if a.device.type == "cpu":
        return (a * b).sum(dim=1)
    return bmm_row_dots(a, b)


def bmm_row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`row_dots` off the CPU: one batched product of n (1, d) x (d, 1) matrices."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
