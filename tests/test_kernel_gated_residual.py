"""kernels/gated_residual.py against the reference op `gated_residual_backward` (comparison rule:
tests/kernel_cases.py): odd widths, a strided gate, one image of 70 rows; fp32/fp16 under the
interpreter, and bf16 too on a GPU."""

from __future__ import annotations

import pytest
import torch

from fastlego import reference
from fastlego.kernels import gated_residual as GR
import kernel_cases as kc
from kernel_cases import DEVICE_DTYPES, check_piece, gen, rand64

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter

poisoned_empty = kc.poisoned_empty   # the fixture


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 24), (3, 1, 7, 40), (1, 70, 1, 16)])
def test_gated_residual_backward_kernel(poisoned_empty, device, dtype, shape):
    B, L, T, N = shape
    g = gen(21)
    y, gout = rand64((B * L, T, N), g), rand64((B * L, T, N), g)
    gate = rand64((B, 3 * N), g)[:, N:2 * N]
    ref = reference.gated_residual_backward(gout, y, gate)
    cast = [t.to(device, dtype) for t in (gout, y, gate)]
    same = reference.gated_residual_backward(*cast)
    got = GR.gated_residual_backward(*cast)
    for name, o, r, s in zip(("dy", "dgate", "dbias"), got, ref, same):
        assert o.dtype == (torch.float32 if name == "dbias" else dtype) and o.shape == r.shape
        check_piece(o, r.to(device), s, dtype, f"gated_residual_backward {name} {dtype} {shape}")


def test_bad_calls_are_refused():
    h = torch.zeros(6, 5, 24)
    with pytest.raises(ValueError, match=r"gate must be a per-image \(B, 24\)"):
        GR.gated_residual_backward(h, h, torch.zeros(2, 7))
    with pytest.raises(ValueError, match="grad_out must have y's shape"):
        GR.gated_residual_backward(h[:1], h, torch.zeros(2, 24))
    assert any("4096" in r for r in GR.gated_residual_backward_not_supported_reasons(
        torch.zeros(2, 1, 5000), torch.zeros(2, 1, 5000), torch.zeros(2, 5000)))
