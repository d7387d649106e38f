"""kernels/gelu.py against the reference op `gelu_tanh_backward` (comparison rule:
tests/kernel_cases.py): both tails of GELU (saturated and negative-slope), odd widths, more than
256 rows, grad written in place, act written over pre or not; fp32/fp16 under the interpreter,
and bf16 too on a GPU."""

from __future__ import annotations

import pytest
import torch

from fastlego import reference
from fastlego.kernels import gelu as GE
import kernel_cases as kc
from kernel_cases import DEVICE_DTYPES, check_piece, gen, rand64

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter

poisoned_empty = kc.poisoned_empty   # the fixture


@pytest.mark.parametrize("act_into_pre", [False, True])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(6, 5, 96), (7, 1, 200), (1, 300, 16)])   # odd widths, > 256 rows
def test_gelu_tanh_backward_kernel(poisoned_empty, device, dtype, shape, act_into_pre):
    g = gen(23)
    pre = rand64(shape, g, 2.5, -0.3)            # both tails: saturated and negative-slope GELU
    pre[0, 0, :4] = torch.tensor([-30.0, 30.0, 0.0, -0.75])
    gact = rand64(shape, g)
    ref = reference.gelu_tanh_backward(gact.clone(), pre)
    cast = [t.to(device, dtype) for t in (gact, pre)]
    same = reference.gelu_tanh_backward(cast[0].clone(), cast[1])
    grad, pre_in = cast[0].clone(), cast[1].clone()
    got = GE.gelu_tanh_backward(grad, pre_in, act_into_pre)
    assert got[0].data_ptr() == grad.data_ptr(), "grad_pre is written in place"
    if act_into_pre:   # act written over pre: pre now holds GELU(pre)
        assert got[1].data_ptr() == pre_in.data_ptr() and torch.equal(pre_in, got[1])
        twin = reference.gelu_tanh_backward(cast[0].clone(), cast[1].clone(), True)
        assert torch.equal(twin[1], same[1]) and torch.equal(twin[0], same[0])
    else:
        assert torch.equal(pre_in, cast[1]), "pre is left intact"
    for name, o, r, s in zip(("grad_pre", "act", "dbias"), got, ref, same):
        assert o.dtype == (torch.float32 if name == "dbias" else dtype) and o.shape == r.shape
        check_piece(o, r.to(device), s, dtype, f"gelu_tanh_backward {name} {dtype} {shape}")


def test_bad_calls_are_refused():
    h = torch.zeros(6, 5, 24)
    with pytest.raises(ValueError, match="grad must have pre's shape"):
        GE.gelu_tanh_backward(h, h[:1])
    with pytest.raises(ValueError, match="written in place and must be contiguous"):
        GE.gelu_tanh_backward(h.transpose(0, 1), h.transpose(0, 1))
    with pytest.raises(ValueError, match="act_into_pre writes act over pre"):
        GE.gelu_tanh_backward(h.transpose(0, 1).contiguous(), h.transpose(0, 1), True)
    assert any("float64 not supported" in r for r in GE.gelu_tanh_backward_not_supported_reasons(h.double(), h))
