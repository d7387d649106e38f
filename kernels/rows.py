"""Tiling of the memory-bound row-wise kernels (LayerNorm statistics and LN-modulate passes, and
the row-wise backward kernels), shared by their modules. Tiles are fixed by the shape alone (no
autotuning), so every summation order, hence every result, is reproducible."""

from __future__ import annotations

from typing import List

import triton
import triton.language as tl

from .policy import cdiv, next_power_of_2

# Columns per chunk of the forward row passes (LN statistics, LN-modulate), which stream a row
# in chunks and merge the chunks' statistics.
STATS_MAX_BLOCK_K = 512


def stats_blocks(K: int):
    """(BLOCK_ROWS, BLOCK_K, num_warps) of the forward row passes: chunks of up to
    STATS_MAX_BLOCK_K columns, ~4K elements per program (memory bound: many small programs keep
    HBM busy)."""
    block_k = min(next_power_of_2(K), STATS_MAX_BLOCK_K)
    return max(1, 4096 // block_k), block_k, 4


@triton.jit
def image_rows(img, first, it, rows_per_image, col_mask, BLOCK_ROWS: tl.constexpr):
    """Rows (int64, absolute) and the (BLOCK_ROWS, width) mask of step `it` of a row-wise backward
    program that owns the rows first + [0, ROW_ITERS * BLOCK_ROWS) of image `img` (rows of one
    image are contiguous: image img holds rows img * rows_per_image ...; none past its end)."""
    local = first + it * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    rows = img.to(tl.int64) * rows_per_image + local
    mask = (local < rows_per_image)[:, None] & col_mask[None, :]
    return rows, mask


# The row-wise backward kernels hold whole rows (K or N features) in registers.
BACKWARD_MAX_WIDTH = 4096
# Rows per program of the row-wise backward kernels: the per-image partial sums are one fp32 row
# per program, so more rows per program means fewer partials to sum (M / 64 rows of K floats).
_BACKWARD_ROWS_PER_PROGRAM = 64


def row_backward_blocks(width: int, rows_per_image: int):
    """(BLOCK_ROWS, BLOCK_W, ROW_ITERS, blocks_per_image, num_warps) of the row-wise backward
    kernels: ~4K elements per row tile, up to 64 rows of one image per program (a program never
    straddles two images, so its column sums are one image's partial)."""
    block_w = next_power_of_2(width)
    block_rows = max(1, min(16, 4096 // block_w))
    rows = min(_BACKWARD_ROWS_PER_PROGRAM, max(rows_per_image, 1))
    row_iters = cdiv(rows, block_rows)
    blocks_per_image = cdiv(max(rows_per_image, 1), block_rows * row_iters)
    return block_rows, block_w, row_iters, blocks_per_image, (8 if block_w >= 2048 else 4)


def row_backward_problems(x_name: str, width: int) -> List[str]:
    """Rows wider than the row-wise backward kernels hold."""
    if width > BACKWARD_MAX_WIDTH:
        return [f"{x_name} rows have {width} features: the Triton backward kernels hold whole rows of at most "
                f"{BACKWARD_MAX_WIDTH} (the reference backward takes wider ones)"]
    return []
