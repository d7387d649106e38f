"""One op, one name: for every op the dispatcher knows (`fastlego.dispatch.ops()`), its reference
twin `fastlego.reference.<op>`, its Triton launcher `fastlego.kernels.<module>.<op>` with
`<op>_not_supported_reasons`, every other backend, and its entry point in `fastlego.ops` (the
forward ops) carry the op's name and the reference twin's signature; the kernel module has its
test file tests/test_kernel_<module>.py."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from fastlego import custom_ops, dispatch, ops, reference

TESTS = Path(__file__).resolve().parent
FORWARD_OPS = ("brick_embed", "modulated_linear", "window_attention", "global_attention", "linear_gated_residual",
               "final_layer")


def _params(fn):
    """(name, default) of the parameters a dispatcher call passes: every one but keyword-only
    (`out=`) and *args / **kwargs."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


def test_every_op_is_declared_with_its_kernel_module():
    assert list(ops.KERNEL_MODULES) == dispatch.ops()
    assert set(FORWARD_OPS) <= set(dispatch.ops())


@pytest.mark.parametrize("op", dispatch.ops())
def test_reference_twin_has_the_ops_name_and_signature(op):
    twin = getattr(reference, op)
    assert twin.__name__ == op
    [ref] = [b for b in dispatch.backends(op) if b.name == "reference"]
    assert ref.target == f"fastlego.reference:{op}" and ref.reasons_target is None


@pytest.mark.parametrize("op", dispatch.ops())
def test_every_backend_takes_the_reference_twins_signature(op):
    pytest.importorskip("triton")
    want = _params(getattr(reference, op))
    module = f"fastlego.kernels.{ops.KERNEL_MODULES[op]}"
    for backend in dispatch.backends(op):
        if backend.name == "triton":
            assert backend.target == f"{module}:{op}"
            assert backend.reasons_target == f"{module}:{op}_not_supported_reasons"
        fn = dispatch._resolve(backend.target)
        assert _params(fn) == want, (op, backend.name)
        if backend.reasons_target is not None:
            assert _params(dispatch._resolve(backend.reasons_target)) == want, (op, backend.name, "reasons")


@pytest.mark.parametrize("op", FORWARD_OPS)
def test_forward_ops_have_their_entry_point_and_custom_op(op):
    """fastlego.ops.<op> takes the twin's arguments (linear_gated_residual adds `keep_y`, how its
    backward gets y); the custom op fastlego::<op> exists, but for global_attention, which trains
    on its backends' own autograd (deterministic mode: fastlego::window_attention with
    op="global_attention")."""
    entry = getattr(ops, op)
    assert entry.__name__ == op
    assert _params(entry)[:len(_params(getattr(reference, op)))] == _params(getattr(reference, op))
    if op != "global_attention":
        assert hasattr(custom_ops, op) and hasattr(torch.ops.fastlego, op)


@pytest.mark.parametrize("op", dispatch.ops())
def test_each_kernel_module_has_its_test_file(op):
    assert (TESTS / f"test_kernel_{ops.KERNEL_MODULES[op]}.py").is_file()
