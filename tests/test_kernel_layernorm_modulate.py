"""kernels/layernorm_modulate.py against the reference ops `layernorm_modulate` and
`layernorm_modulate_backward` (comparison rule: tests/kernel_cases.py): odd widths, strided
per-image tables, one image of 70 rows, a residual gradient added in; fp32/fp16 under the
interpreter, and bf16 too on a GPU."""

from __future__ import annotations

import pytest
import torch

from fastlego import reference
from fastlego.kernels import layernorm_modulate as LM
from fastlego.testing import max_error
import kernel_cases as kc
from kernel_cases import DEVICE_DTYPES, check_piece, gen, rand64

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter

poisoned_empty = kc.poisoned_empty   # the fixture

SHAPES = [(2, 3, 5, 24), (3, 1, 7, 33), (1, 70, 1, 16)]   # (B, L, T, K): odd widths, 70 rows/image


def _inputs(shape, seed=20):
    B, L, T, K = shape
    g = gen(seed)
    ada = rand64((B, 2 * K), g, 0.5)
    h, shift, scale = rand64((B * L, T, K), g, 2.0, 0.5), ada[:, :K], ada[:, K:]
    return h, shift, scale, g


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_modulate_kernel(poisoned_empty, device, dtype, shape):
    h, shift, scale, _ = _inputs(shape)
    cast = [t.to(device, dtype) for t in (h, shift, scale)]
    a = LM.layernorm_modulate(*cast, dtype)
    assert a.dtype == dtype and a.shape == (h.numel() // h.shape[-1], h.shape[-1])
    check_piece(a, reference.layernorm_modulate(h, shift, scale).to(device),
                reference.layernorm_modulate(*cast, dtype), dtype, f"layernorm_modulate {dtype} {shape}")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_modulate_backward_kernel(poisoned_empty, device, dtype, shape):
    h, shift, scale, g = _inputs(shape)
    ga = rand64(h.shape, g)
    ref = reference.layernorm_modulate_backward(h, shift, scale, ga)
    cast = [t.to(device, dtype) for t in (h, shift, scale, ga)]
    same = reference.layernorm_modulate_backward(*cast)
    got = LM.layernorm_modulate_backward(*cast)
    for name, o, r, s in zip(("dh", "dshift", "dscale"), got, ref, same):
        assert o.dtype == dtype and o.shape == r.shape
        check_piece(o, r.to(device), s, dtype, f"layernorm_modulate_backward {name} {dtype} {shape}")
    # with the residual branch's gradient added in (a strided one: every other column of a wider tensor)
    B, L, T, K = shape
    gres = rand64((B * L, T, 2 * K), g)[..., ::2]
    ref = reference.layernorm_modulate_backward(h, shift, scale, ga, gres)
    same = reference.layernorm_modulate_backward(*cast, gres.to(device, dtype))
    got = LM.layernorm_modulate_backward(*cast, gres.to(device, dtype))
    for name, o, r, s in zip(("dh+res", "dshift", "dscale"), got, ref, same):
        check_piece(o, r.to(device), s, dtype, f"layernorm_modulate_backward {name} {dtype} {shape}")


def test_fp16_layernorm_backward_does_not_overflow():
    """fp16 rows with |h| ~ 2e4 (h^2 overflows fp16): the statistics and the backward run in fp32."""
    B, K = 2, 64
    g = gen(12)
    h = (rand64((B * 3, 4, K), g, 1.0, 0.0) * 2e4).clamp(-6e4, 6e4).half().double()   # fp16-representable
    ada = rand64((B, 2 * K), g, 0.5)
    ga = rand64(h.shape, g)
    ref = reference.layernorm_modulate_backward(h, ada[:, :K], ada[:, K:], ga)
    got = LM.layernorm_modulate_backward(*(t.half() for t in (h, ada[:, :K], ada[:, K:], ga)))
    for o, r in zip(got, ref):
        assert torch.isfinite(o).all()
        assert max_error(o, r) <= 2e-3 * r.abs().max().item()


def test_bad_calls_are_refused():
    h, shift, scale, _ = _inputs(SHAPES[0])
    h, shift, scale = h.float(), shift.float(), scale.float()
    with pytest.raises(ValueError, match="grad_a must be a tensor of h's shape"):
        LM.layernorm_modulate_backward(h, shift, scale, h[:1])
    with pytest.raises(ValueError, match="grad_h must be a tensor of h's shape"):
        LM.layernorm_modulate_backward(h, shift, scale, h, h[:1])
    assert any("4096" in r for r in LM.layernorm_modulate_backward_not_supported_reasons(
        torch.zeros(2, 1, 5000), torch.zeros(2, 5000), torch.zeros(2, 5000), torch.zeros(2, 1, 5000)))
    with pytest.raises(ValueError, match=r"scale must be a per-image \(B, 24\)"):
        LM.layernorm_modulate(h, shift, scale[:, :8])
    assert any("output dtype torch.int32 not supported" in r
               for r in LM.layernorm_modulate_not_supported_reasons(h, shift, scale, torch.int32))
