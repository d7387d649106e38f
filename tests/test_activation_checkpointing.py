"""Activation checkpointing per brick or per block: same gradients, fewer saved activations."""

import pytest
import torch

import fastlego
from fastlego.testing import randomize_


def _model(mode=None):
    m = fastlego.LegoBackbone([4, 8, 16], 3, label_dim=4, model_type=[(32, 2, 2), (32, 4, 2), (32, 2, 2)],
                              depths=[2, 1, 2], activation_checkpointing=mode)
    return randomize_(m, seed=7).train()


def _grads_and_saved_bytes(model):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 32, generator=g), torch.randn(2, generator=g)
    y = torch.nn.functional.one_hot(torch.tensor([1, 3]), 4).float()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, t, y, force_drop_ids=torch.tensor([0, 1]))
        loss = (out ** 2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("mode", ["brick", "block"])
def test_same_gradients_less_saved(mode):
    ref_grads, ref_bytes = _grads_and_saved_bytes(_model())
    grads, saved_bytes = _grads_and_saved_bytes(_model(mode))
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for g in grads.values())
    assert saved_bytes < 0.7 * ref_bytes, (mode, saved_bytes, ref_bytes)


def test_off_by_default_and_bad_mode():
    m = _model()
    assert m.activation_checkpointing is None and not any(b.checkpointing for b in m.model)
    with pytest.raises(ValueError, match="expected None, 'brick' or 'block'"):
        m.set_activation_checkpointing("layer")
    assert m.set_activation_checkpointing("block").model[2].checkpointing == "block"
    assert m.activation_checkpointing == "block"


def test_first_n_blocks_only():
    """blocks=N checkpoints the first N DiT blocks (across bricks): same gradients, and the saved
    bytes fall between none and every block, more blocks saving more."""
    ref_grads, ref_bytes = _grads_and_saved_bytes(_model())
    _, all_bytes = _grads_and_saved_bytes(_model("block"))
    saved = {}
    for n in (1, 3):
        m = _model().set_activation_checkpointing("block", blocks=n)
        assert m.checkpointed_blocks == n
        assert [b.checkpoint_blocks for b in m.model] == ([1, 0, 0] if n == 1 else [2, 1, 0])
        grads, saved[n] = _grads_and_saved_bytes(m)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert all_bytes < saved[3] < saved[1] < ref_bytes, (all_bytes, saved, ref_bytes)
    m = _model()
    assert m.set_activation_checkpointing("block", blocks=0).checkpointed_blocks == 0
    assert m.set_activation_checkpointing("block").checkpointed_blocks == 5
    assert m.set_activation_checkpointing(None).checkpointed_blocks == 0
    with pytest.raises(ValueError, match="from 0 to 5"):
        m.set_activation_checkpointing("block", blocks=6)
    with pytest.raises(ValueError, match="needs activation_checkpointing='block'"):
        m.set_activation_checkpointing("brick", blocks=2)
