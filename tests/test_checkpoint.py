"""Checkpoint I/O: the release's persistence pickles (read without running their code), preset
inference from shapes, safetensors round trips, plain state-dict files, clear errors.

The release pickle is built here in the release's exact format: fake `torch_utils.persistence`,
`training.lego_models`, `timm.*` modules exist in `sys.modules` only while dumping; the top-level
network is `torch_utils.persistence._reconstruct_persistent_obj(meta)` with a `module_src` that
would write a marker file and raise if it were ever executed; the modules inside are pickled
objects of the release's classes and of torch.nn; tensors go through torch's own reduce
(`_rebuild_parameter` / `_rebuild_tensor_v2` / `torch.storage._load_from_bytes`).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import io
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastlego
import fastlego.testing
from fastlego import checkpoint
from fastlego.checkpoint import load_checkpoint, save_checkpoint

PRESET = "lego_S_PG_64"
LABEL_DIM = 10

FAKE_MODULES = ["torch_utils", "torch_utils.persistence", "training", "training.lego_models", "timm", "timm.layers",
                "timm.layers.patch_embed", "timm.layers.mlp", "timm.layers.format", "timm.models",
                "timm.models.vision_transformer"]
RELEASE_CLASSES = {
    "training.lego_models": ["LEGO", "LEGO_module", "DiTBlock", "FinalLayer", "TimestepEmbedder",
                             "PositionalEmbedding", "LabelEmbedder"],
    "timm.layers.patch_embed": ["PatchEmbed"],
    "timm.layers.mlp": ["Mlp"],
    "timm.models.vision_transformer": ["Attention"],
}


def module_src(marker: str) -> str:
    """The persistent class's source text: executing it leaves a marker file and raises."""
    return (f"open({marker!r}, 'w').write('module_src was executed')\n"
            f"raise RuntimeError('the checkpoint loader executed module_src')\n"
            f"class EDMPrecondLEGO: pass\n")


@contextlib.contextmanager
def release_modules():
    """Fake release/timm/torch_utils modules in sys.modules, for pickling only; removed after."""
    saved = {name: sys.modules.pop(name) for name in FAKE_MODULES if name in sys.modules}
    mods = {name: types.ModuleType(name) for name in FAKE_MODULES}
    ns = types.SimpleNamespace()
    for modname, names in RELEASE_CLASSES.items():
        for name in names:
            cls = type(name, (nn.Module,), {"__module__": modname, "__qualname__": name})
            setattr(mods[modname], name, cls)
            setattr(ns, name, cls)
    ns.Format = enum.Enum("Format", [("NCHW", "NCHW"), ("NHWC", "NHWC"), ("NCL", "NCL"), ("NLC", "NLC")],
                          module="timm.layers.format", qualname="Format", type=str)
    mods["timm.layers.format"].Format = ns.Format

    def _reconstruct_persistent_obj(meta):  # the real one execs meta['module_src']
        raise AssertionError("the fake persistence function must never be called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Persistent:
        """Pickles as EDM's persistent_class Decorator.__reduce__ does."""

        def __init__(self, class_name, state, src):
            self.meta = dict(type="class", version=6, module_src=src, class_name=class_name, state=state)

        def __reduce_ex__(self, protocol):
            return _reconstruct_persistent_obj, (self.meta,)

    ns.Persistent = Persistent
    sys.modules.update(mods)
    try:
        yield ns
    finally:
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _with(module: nn.Module, **attrs) -> nn.Module:
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


def release_network(src: fastlego.EDMPrecond, ns) -> nn.Module:
    """The release's EDMPrecondLEGO.model (a `training.lego_models.LEGO`) holding src's weights,
    module for module as the release builds it (timm PatchEmbed/Attention/Mlp, LayerNorms, ...)."""
    b = src.model  # its torch.nn modules are reused as they are: only pickled, never changed
    lego = _with(ns.LEGO(), img_resolution=list(b.img_resolution), max_img_size=b.max_img_size,
                 in_channels=b.in_channels, label_dim=b.label_dim, num_bricks=b.num_bricks,
                 train_intermediate_stages=b.train_intermediate_stages, use_fp16=False)
    bricks = []
    for brick in b.model:
        D, p, r = brick.width, brick.patch, brick.region
        cin = brick.x_embedder.proj.in_channels
        pe = _with(ns.PatchEmbed(), img_size=(r, r), patch_size=(p, p), grid_size=(r // p, r // p),
                   num_patches=(r // p) ** 2, flatten=True, output_fmt=ns.Format.NCHW, strict_img_size=True,
                   dynamic_img_pad=False)
        pe.proj, pe.norm = brick.x_embedder.proj, nn.Identity()
        lm = _with(ns.LEGO_module(), learn_sigma=False, out_channels=brick.out_channels, in_channels=cin,
                   patch_size=p, num_heads=brick.num_heads, hidden_size=D)
        lm.x_embedder = pe
        lm.pos_embed = nn.Parameter(brick.pos_embed.detach().clone(), requires_grad=False)
        blocks = nn.ModuleList()
        for blk in brick.blocks:
            attn = _with(ns.Attention(), num_heads=blk.attn.num_heads, head_dim=D // blk.attn.num_heads,
                         scale=(D // blk.attn.num_heads) ** -0.5, fused_attn=True)
            attn.qkv, attn.q_norm, attn.k_norm = blk.attn.qkv, nn.Identity(), nn.Identity()
            attn.attn_drop, attn.proj, attn.proj_drop = nn.Dropout(0.0), blk.attn.proj, nn.Dropout(0.0)
            mlp = ns.Mlp()
            mlp.fc1, mlp.act, mlp.drop1 = blk.mlp.fc1, nn.GELU(approximate="tanh"), nn.Dropout(0.0)
            mlp.norm, mlp.fc2, mlp.drop2 = nn.Identity(), blk.mlp.fc2, nn.Dropout(0.0)
            block = _with(ns.DiTBlock(), hidden_size=D, num_heads=blk.attn.num_heads, mlp_ratio=4.0)
            block.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            block.attn = attn
            block.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            block.mlp = mlp
            block.adaLN_modulation = blk.adaLN_modulation
            blocks.append(block)
        lm.blocks = blocks
        final = _with(ns.FinalLayer(), out_channels=brick.out_channels, patch_size=p, hidden_size=D)
        final.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        final.linear, final.adaLN_modulation = brick.final_layer.linear, brick.final_layer.adaLN_modulation
        lm.final_layer = final
        bricks.append(lm)
    lego.model = nn.ModuleList(bricks)
    D = b.model[0].width
    t_emb = _with(ns.TimestepEmbedder(), frequency_embedding_size=256, hidden_size=D)
    t_emb.mlp = b.t_embedder.mlp
    t_emb.positional_embedding = _with(ns.PositionalEmbedding(), num_channels=256, max_positions=10000, endpoint=False)
    lego.t_embedder = t_emb
    if b.y_embedder is not None:
        y_emb = _with(ns.LabelEmbedder(), label_dim=b.label_dim, hidden_size=D, dropout_prob=b.class_dropout_prob)
        y_emb.embedding_table = b.y_embedder.embedding_table
        lego.y_embedder = y_emb
    else:
        lego.y_embedder = None
    lego.map_augment = b.map_augment
    return lego


def dump_release_pickle(path, src: fastlego.EDMPrecond, init_kwargs: dict, marker: str) -> None:
    """Write `src` as the release writes `network-snapshot-*.pkl` (pickle.dump of a dict)."""
    with release_modules() as ns:
        wrapper = nn.Module()
        for name in ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data"):
            setattr(wrapper, name, getattr(src, name))
        wrapper.model = release_network(src, ns)
        wrapper.eval()
        state = dict(wrapper.__dict__, _init_args=(), _init_kwargs=dict(init_kwargs))
        ema = ns.Persistent("EDMPrecondLEGO", state, module_src(marker))
        loss_fn = ns.Persistent("LEGOEDMLoss", dict(_init_args=(), _init_kwargs={}, P_mean=-1.2, P_std=1.2, sigma_data=0.5),
                                module_src(marker))
        data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=None,
                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="datasets/in64.zip",
                                        use_labels=True, xflip=False, cache=True, use_latent=False, resolution=64,
                                        max_size=1281167))
        with open(path, "wb") as f:
            pickle.dump(data, f)


def release_init_kwargs(**changes) -> dict:
    # What the release's train.py / training_loop pass to EDMPrecondLEGO.
    kw = dict(model_type=PRESET, use_fp16=False, img_resolution=64, img_channels=3, label_dim=LABEL_DIM,
              train_intermediate_stages=True)
    kw.update(changes)
    return {k: v for k, v in kw.items() if v is not None}


def assert_fake_modules_absent():
    present = [name for name in FAKE_MODULES if name in sys.modules]
    assert not present, f"fake release modules left in sys.modules: {present}"


def outputs(net, inputs):
    x, sigma, labels = inputs
    with fastlego.use_backend("reference"), torch.no_grad():
        return net(x, sigma, labels)


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """One intra-op thread while these tests run: their CPU work is small, and on a shared CPU
    OpenMP threads spin-waiting for each other cost more (2-3x here) than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source(_one_cpu_thread):
    """A randomised (all weights non-zero) S-PG-64 EDMPrecond with 10 classes, training its
    intermediate stages as the release does; eval mode."""
    net = fastlego.EDMPrecond(64, 3, label_dim=LABEL_DIM, model_type=PRESET, train_intermediate_stages=True)
    fastlego.testing.randomize_(net, seed=3)
    return net.eval().requires_grad_(False)  # as the release pickles its EMA copy


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=g)
    sigma = torch.tensor([0.7])
    labels = torch.nn.functional.one_hot(torch.tensor([9]), LABEL_DIM).float()
    return x, sigma, labels


@pytest.fixture(scope="module")
def expected(source, inputs):
    out = outputs(source, inputs)
    assert out.abs().mean() > 1e-2 and torch.isfinite(out).all()  # non-trivial outputs
    return out


@pytest.fixture(scope="module")
def release_pkl(source, tmp_path_factory):
    d = tmp_path_factory.mktemp("release")
    marker = str(d / "module_src_was_executed")
    path = d / "network-snapshot-lego-s-pg-64.pkl"
    dump_release_pickle(path, source, release_init_kwargs(), marker)
    return path, marker


def test_release_pickle_is_in_the_release_format(release_pkl):
    path, _ = release_pkl
    raw = path.read_bytes()
    for needle in (b"torch_utils.persistence", b"_reconstruct_persistent_obj", b"module_src", b"EDMPrecondLEGO",
                   b"training.lego_models", b"LEGO_module", b"DiTBlock", b"timm.layers.patch_embed",
                   b"timm.models.vision_transformer", b"timm.layers.format", b"torch.nn.modules.linear",
                   b"_rebuild_parameter", b"_rebuild_tensor_v2", b"_load_from_bytes", b"_init_kwargs"):
        assert needle in raw, needle
    assert_fake_modules_absent()
    # A normal unpickle needs the release's code (and would run module_src): it fails here.
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(raw)


def test_release_pickle_loads_exactly(source, inputs, expected, release_pkl):
    path, marker = release_pkl
    assert_fake_modules_absent()
    net = load_checkpoint(path)
    assert_fake_modules_absent()
    assert isinstance(net, fastlego.EDMPrecond) and not net.training
    assert net.model_type == PRESET and net.label_dim == LABEL_DIM and net.img_channels == 3
    assert net.img_resolution == 64 and net.sigma_data == 0.5 and net.use_fp16 is False
    assert net.model.train_intermediate_stages is True and net.model.class_dropout_prob == pytest.approx(0.1)
    assert_same_weights(net, source)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in net.state_dict().values())
    assert torch.equal(outputs(net, inputs), expected)
    assert not os.path.exists(marker), "module_src was executed"


def test_module_src_is_kept_as_data_never_executed(release_pkl):
    path, marker = release_pkl
    data = checkpoint.load_release_pickle(path)
    assert sorted(data) == ["augment_pipe", "dataset_kwargs", "ema", "loss_fn"]
    ema = data["ema"]
    assert isinstance(ema, checkpoint.PersistentObjectStandIn)
    assert (ema.type, ema.version, ema.class_name) == ("class", 6, "EDMPrecondLEGO")
    assert ema.module_src == module_src(marker)
    assert ema.state["_init_kwargs"]["model_type"] == PRESET
    brick = ema.state["_modules"]["model"]._modules["model"]._modules["0"]
    assert type(brick).__module__ == "training.lego_models" and type(brick).__qualname__ == "LEGO_module"
    assert brick._modules["x_embedder"].output_fmt is checkpoint.Format.NCHW
    assert not os.path.exists(marker)
    # The marker check can fail: executing the stored source does write it.
    with pytest.raises(RuntimeError, match="executed module_src"):
        exec(compile(ema.module_src, "<module_src>", "exec"), {})
    assert os.path.exists(marker)
    os.remove(marker)


def test_load_state_dict_from_release(source, release_pkl):
    sd, config = fastlego.load_state_dict_from_release(release_pkl[0])
    assert sd.keys() == source.state_dict().keys()
    assert config["model_type"] == PRESET and config["label_dim"] == LABEL_DIM
    assert config["sigma_max"] == float("inf") and config["train_intermediate_stages"] is True


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_unknown_globals_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({"ema": _Evil(os.system, f"touch {marker}")})
    name = f"{os.system.__module__}.system"
    with pytest.raises(pickle.UnpicklingError, match=f"'{name}'"):
        checkpoint.load_release_pickle(io.BytesIO(blob))
    assert not marker.exists()
    for func, args in [(eval, ("1",)), (getattr, (collections.OrderedDict, "fromkeys")), (torch.load, ("x",))]:
        with pytest.raises(pickle.UnpicklingError, match="refusing|not allowed"):
            checkpoint.load_release_pickle(io.BytesIO(pickle.dumps(_Evil(func, *args))))


def test_unknown_global_inside_a_release_file_is_refused(tmp_path):
    marker = str(tmp_path / "module_src_was_executed")
    path = tmp_path / "evil.pkl"
    with release_modules() as ns:
        state = dict(_init_args=(), _init_kwargs=release_init_kwargs(), _modules={"model": None},
                     hook=_Evil(eval, "print('pwned')"))
        with open(path, "wb") as f:
            pickle.dump({"ema": ns.Persistent("EDMPrecondLEGO", state, module_src(marker))}, f)
    with pytest.raises(pickle.UnpicklingError, match=r"'builtins\.eval'"):
        load_checkpoint(path)
    assert not os.path.exists(marker)


def test_enum_members_by_value_and_by_name():
    with release_modules() as ns:
        by_value = pickle.dumps([ns.Format.NCHW, ns.Format.NLC])
        by_name = pickle.dumps(_Evil(getattr, ns.Format, "NHWC"))
        bad_name = pickle.dumps(_Evil(getattr, ns.Format, "__class__"))
    assert checkpoint.load_release_pickle(io.BytesIO(by_value)) == [checkpoint.Format.NCHW, checkpoint.Format.NLC]
    assert checkpoint.load_release_pickle(io.BytesIO(by_name)) is checkpoint.Format.NHWC
    with pytest.raises(pickle.UnpicklingError, match="getattr"):
        checkpoint.load_release_pickle(io.BytesIO(bad_name))


def test_unpickler_names_are_offered_by_checkpoint_too():
    """The restricted unpickler lives in fastlego.safe_unpickle; fastlego.checkpoint, where it
    lived before, still offers its names, as the same objects."""
    from fastlego import safe_unpickle
    for name in ("RestrictedUnpickler", "UnsafePickleError", "StandInModule", "PersistentObjectStandIn",
                 "EasyDictStandIn", "Format", "standin_class"):
        assert getattr(checkpoint, name) is getattr(safe_unpickle, name), name


def test_preset_inferred_without_model_type(tmp_path):
    # Shapes are what count here: every weight a zero-stride view of one number keeps the file tiny.
    net = fastlego.EDMPrecond(64, 3, label_dim=LABEL_DIM, model_type=PRESET)
    for i, p in enumerate(net.parameters()):
        p.data = torch.full((), float(i + 1)).expand(p.shape)
    marker = str(tmp_path / "module_src_was_executed")
    path = tmp_path / "no-model-type.pkl"
    # Also: a numpy integer among the arguments, and one fastlego does not take (dropped, warned).
    init_kwargs = release_init_kwargs(model_type=None, img_resolution=np.int64(64), dropout=0.13)
    dump_release_pickle(path, net, init_kwargs, marker)
    assert b"lego_S_PG_64" not in path.read_bytes() and b"_reconstruct_persistent_obj" in path.read_bytes()
    with pytest.warns(UserWarning, match="ignoring.*'dropout': 0.13"):
        back = load_checkpoint(path)
    assert back.model_type == PRESET and back.label_dim == LABEL_DIM
    assert back.img_resolution == 64 and type(back.img_resolution) is int
    assert_same_weights(back, net)
    assert not os.path.exists(marker)


def test_model_type_argument_that_does_not_fit_is_a_clear_error(release_pkl):
    with pytest.raises(ValueError, match=r"do not fit.*lego_S_PR_64.*i\.e\. preset 'lego_S_PG_64'"):
        load_checkpoint(release_pkl[0], model_type="lego_S_PR_64")
    with pytest.raises(ValueError, match="unknown LEGO preset"):
        load_checkpoint(release_pkl[0], model_type="lego_M_PG_64")


def test_missing_key_lists_the_entries(release_pkl):
    with pytest.raises(KeyError, match="augment_pipe.*dataset_kwargs.*ema.*loss_fn"):
        load_checkpoint(release_pkl[0], key="net")


def _shapes(name: str, label_dim: int = 1000):
    with torch.device("meta"):
        net = fastlego.EDMPrecond(64, 3, label_dim=label_dim, model_type=name)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_infer_preset_every_preset_and_old_ones():
    for name in fastlego.PRESETS:
        assert checkpoint.infer_preset(_shapes(name)) == name
    old, new = _shapes("lego_L_PG_64_old"), _shapes("lego_L_PG_64")
    assert checkpoint.infer_preset(old) == "lego_L_PG_64_old" and checkpoint.infer_preset(new) == "lego_L_PG_64"
    # Backbone-only keys (no EDM "model." prefix) and tensors instead of shapes work too.
    with torch.device("meta"):
        backbone = fastlego.LegoBackbone.from_preset("lego_L_PR_64_old", label_dim=0)
    assert checkpoint.infer_preset(backbone.state_dict()) == "lego_L_PR_64_old"


def test_weights_that_fit_no_preset_are_a_clear_error():
    shapes = {k: v for k, v in _shapes("lego_L_PG_64").items() if ".model.1.blocks.7." not in k}
    with pytest.raises(ValueError, match=r"fit no LEGO preset.*regions \[4, 16, 64\], depths \[6, 7, 12\], "
                                         r"widths \[1024, 1024, 1024\].*Nearest presets: lego_L_PG_64 .*lego_L_PG_64_old"):
        checkpoint.infer_preset(shapes)
    # A width no preset has: a custom stack. The error spells the stack to pass (heads are not in
    # the shapes) instead of suggesting presets of another width.
    wide = {k: (v[:-1] + (512,) if k.endswith("pos_embed") else v) for k, v in _shapes("lego_S_U_32").items()}
    with pytest.raises(ValueError, match=r"widths \[512, 512, 512, 512, 512\].*custom brick stack.*"
                                         r"model_type='32:w512p2h<HEADS>:6,16:w512p8h<HEADS>:4,") as info:
        checkpoint.infer_preset(wide)
    assert "lego_S_U_32" not in str(info.value)
    with pytest.raises(ValueError, match="no LEGO bricks"):
        checkpoint.infer_preset({"weight": (3, 3)})


def test_unfit_state_dict_file_is_a_clear_error(tmp_path):
    # Zero-stride views keep the file tiny; shapes are all that matter here.
    sd = {k: torch.zeros(()).expand(v) for k, v in _shapes(PRESET, LABEL_DIM).items() if ".model.2.blocks.5." not in k}
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"depths \[2, 4, 5\].*Nearest presets: lego_S_PG_64"):
        load_checkpoint(tmp_path / "odd.pt")


def test_safetensors_round_trip(source, inputs, expected, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors import safe_open
    path = tmp_path / "net.safetensors"
    save_checkpoint(source, path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(source.state_dict()) and "model.model.2.pos_embed" in f.keys()
    config = checkpoint.json.loads(meta[checkpoint.SAFETENSORS_CONFIG_KEY])
    assert config["model_type"] == PRESET and config["label_dim"] == LABEL_DIM and config["sigma_max"] == "inf"
    assert config["train_intermediate_stages"] is True and config["augment_dim"] == 0
    assert "bricks" not in config   # a preset is stored by its name
    net = load_checkpoint(path)
    assert net.sigma_max == float("inf") and net.model.train_intermediate_stages is True and not net.training
    assert_same_weights(net, source)
    assert torch.equal(outputs(net, inputs), expected)


def test_safetensors_round_trip_keeps_backbone_options(source, tmp_path):
    pytest.importorskip("safetensors")
    net = fastlego.EDMPrecond(64, 3, label_dim=0, model_type=PRESET, sigma_min=0.002, sigma_max=80.0, sigma_data=0.6,
                              augment_dim=9, class_dropout_prob=0.25)
    # The source's random weights (randomize_ is slow on 34M weights), a random map_augment.
    missing, unexpected = net.load_state_dict(source.state_dict(), strict=False)
    assert sorted(missing) == ["model.map_augment.bias", "model.map_augment.weight"] and len(unexpected) == 2
    fastlego.testing.randomize_(net.model.map_augment, seed=5)
    save_checkpoint(net, tmp_path / "aug.safetensors")
    back = load_checkpoint(tmp_path / "aug.safetensors")
    assert (back.label_dim, back.sigma_min, back.sigma_max, back.sigma_data) == (0, 0.002, 80.0, 0.6)
    assert back.model.augment_dim == 9 and back.model.class_dropout_prob == 0.25 and back.model.y_embedder is None
    assert back.state_dict().keys() == net.state_dict().keys()
    for key in ("model.map_augment.weight", "model.map_augment.bias", "model.model.1.blocks.3.mlp.fc2.weight"):
        assert torch.equal(back.state_dict()[key], net.state_dict()[key]), key
    # Overrides replace what the file says; unknown ones are an error.
    assert load_checkpoint(tmp_path / "aug.safetensors", sigma_data=0.5, use_fp16=True).sigma_data == 0.5
    with pytest.raises(TypeError, match=r"unknown arguments \['sigma_dta'\].*sigma_data"):
        load_checkpoint(tmp_path / "aug.safetensors", sigma_dta=0.5)


def test_plain_state_dict_files(source, tmp_path):
    torch.save(source.state_dict(), tmp_path / "edm.pt")
    net = load_checkpoint(tmp_path / "edm.pt")
    assert (net.model_type, net.label_dim, net.img_channels, net.img_resolution) == (PRESET, LABEL_DIM, 3, 64)
    assert_same_weights(net, source)
    # The backbone's own keys (no "model." prefix) load too.
    torch.save(source.model.state_dict(), tmp_path / "backbone.pt")
    back = load_checkpoint(tmp_path / "backbone.pt")
    assert back.state_dict().keys() == source.state_dict().keys()
    assert torch.equal(back.model.t_embedder.mlp[2].weight, source.model.t_embedder.mlp[2].weight)


def test_torch_file_with_objects_is_refused(tmp_path):
    torch.save({"ema": _Evil(print, "pwned")}, tmp_path / "objects.pt")
    with pytest.raises(pickle.UnpicklingError, match="weights_only|more than tensors"):
        load_checkpoint(tmp_path / "objects.pt")


def test_missing_file_and_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pkl")
    with pytest.raises(IsADirectoryError, match="directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="URL"):
        load_checkpoint("https://example.com/lego.pkl")
    (tmp_path / "cut.pkl").write_bytes(b"\x80\x04\x95")
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(tmp_path / "cut.pkl")
    (tmp_path / "text.pkl").write_bytes(b"hello, not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pkl")


def test_save_checkpoint_without_safetensors_says_how_to_install(source, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install safetensors.*fastlego\[io\]"):
        save_checkpoint(source, tmp_path / "x.safetensors")


def test_save_checkpoint_rejects_non_edm_models(source, tmp_path):
    pytest.importorskip("safetensors")
    with pytest.raises(TypeError, match="EDMPrecond"):
        save_checkpoint(source.model, tmp_path / "x.safetensors")


@pytest.mark.cuda
def test_load_to_cuda_matches_cpu(inputs, expected, release_pkl):
    """map_location puts every tensor on the GPU; the GPU model (reference ops, fp32, TF32 off)
    reproduces the CPU outputs up to float rounding."""
    net = load_checkpoint(release_pkl[0], map_location=torch.device("cuda", 0))
    assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in net.state_dict().values())
    x, sigma, labels = (t.cuda() for t in inputs)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the patch conv too
    try:
        with fastlego.use_backend("reference"), torch.no_grad():
            got = net(x, sigma, labels).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    fastlego.testing.assert_close_to_reference(got, expected, atol=1e-4, what="loaded model on CUDA vs CPU")


# --------------------------------------------------------------------------------------------
# Every network fastlego builds saves and loads, its spec travelling with the weights
# --------------------------------------------------------------------------------------------

def _round_trip(net, path, *inputs, **kwargs):
    """save -> load; the loaded network and its outputs must equal the original's, bit for bit."""
    pytest.importorskip("safetensors")
    net = net.eval()
    save_checkpoint(net, path)
    back = load_checkpoint(path)
    assert_same_weights(back, net)
    with fastlego.use_backend("reference"), torch.no_grad():
        want, got = net(*inputs, **kwargs), back(*inputs, **kwargs)
    assert want.abs().mean() > 1e-2 and torch.isfinite(want).all()   # random weights: non-trivial outputs
    assert torch.equal(got, want)
    return back


def _metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return checkpoint.json.loads(f.metadata()[checkpoint.SAFETENSORS_CONFIG_KEY])


def test_readme_custom_stack_saves_and_loads(source, inputs, tmp_path):
    """The README's custom stack, wrapped in EDMPrecond without a model_type: its bricks are
    lego_S_PG_64's, so it is stored and rebuilt as that preset (it used to fail on the recorded
    default name lego_XL_U_32)."""
    backbone = fastlego.LegoBackbone(img_resolution=[4, 16, 64], in_channels=3,
                                     model_type=["lego_S_2", "lego_S_8", "lego_S_2"], depths=[2, 4, 6])
    net = fastlego.EDMPrecond(64, 3, label_dim=1000, backbone=backbone)
    assert net.model_type == PRESET and not hasattr(net, "network_spec")
    # source's random weights (randomize_ is slow on 34M weights) and a random 1000-class embedder.
    shared = {k: v for k, v in source.state_dict().items() if "y_embedder" not in k}
    missing, _ = net.load_state_dict(shared, strict=False)
    assert sorted(missing) == ["model.y_embedder.embedding_table.bias", "model.y_embedder.embedding_table.weight"]
    fastlego.testing.randomize_(net.model.y_embedder, seed=7)
    x, sigma, _ = inputs
    back = _round_trip(net, tmp_path / "readme.safetensors", x, sigma, torch.tensor([999]))
    assert back.model_type == PRESET and back.label_dim == 1000 and back.model.train_intermediate_stages is False
    # A wrong recorded name does not matter: the bricks are read from the module.
    net.model_type = "lego_XL_U_32"
    assert _metadata_after_save(net, tmp_path / "named.safetensors")["model_type"] == PRESET


def _metadata_after_save(net, path):
    save_checkpoint(net, path)
    return _metadata(path)


def test_custom_stack_of_release_bricks_saves_and_loads(tmp_path):
    backbone = fastlego.LegoBackbone(img_resolution=[4, 8], in_channels=3, label_dim=0,
                                     model_type=["lego_S_4", "lego_S_8"], depths=[1, 2])
    net = fastlego.testing.randomize_(fastlego.EDMPrecond(8, 3, backbone=backbone), seed=11)
    assert net.model_type == "custom:4:lego_S_4:1,8:lego_S_8:2"
    x = torch.randn(2, 3, 8, 16, generator=torch.Generator().manual_seed(2))
    back = _round_trip(net, tmp_path / "stack.safetensors", x, torch.tensor([0.2, 5.0]))
    meta = _metadata(tmp_path / "stack.safetensors")
    assert meta["bricks"] == {"img_resolution": [4, 8], "model_type": ["lego_S_4", "lego_S_8"], "depths": [1, 2]}
    assert back.model_type == net.model_type and back.model.depths == [1, 2] and back.model.y_embedder is None


def test_custom_width_stack_with_every_option_saves_and_loads(tmp_path):
    """(width, patch, heads) bricks, augment labels, an MLP ratio, class dropout, EDM sigmas,
    no `network_spec` attribute: all from the module's own attributes, all rebuilt."""
    import fastlego.training   # noqa: F401  (the attribute below; other tests may not have imported it)
    backbone = fastlego.LegoBackbone(img_resolution=[4, 16], in_channels=2, label_dim=5, augment_dim=3,
                                     model_type=[(64, 2, 4), (64, 8, 2)], depths=[1, 2], mlp_ratio=3.0,
                                     class_dropout_prob=0.2, train_intermediate_stages=True)
    net = fastlego.EDMPrecond(16, 2, label_dim=5, sigma_min=0.01, sigma_max=50.0, sigma_data=0.7, use_fp16=True,
                              backbone=backbone)
    fastlego.testing.randomize_(net, seed=4)
    g = torch.Generator().manual_seed(3)
    x, augment = torch.randn(3, 2, 16, 32, generator=g), torch.randn(3, 3, generator=g)
    back = _round_trip(net, tmp_path / "wide.safetensors", x, torch.tensor([0.1, 1.0, 9.0]), torch.tensor([0, 4, 2]),
                       augment_labels=augment)
    meta = _metadata(tmp_path / "wide.safetensors")
    assert meta["bricks"]["model_type"] == [[64, 2, 4], [64, 8, 2]] and meta["mlp_ratio"] == 3.0
    assert meta["model_type"] == "custom:4:w64p2h4:1,16:w64p8h2:2"
    assert [(b.width, b.patch, b.num_heads) for b in back.model.model] == [(64, 2, 4), (64, 8, 2)]
    assert (back.sigma_min, back.sigma_max, back.sigma_data, back.use_fp16) == (0.01, 50.0, 0.7, True)
    assert (back.model.augment_dim, back.model.class_dropout_prob, back.model.train_intermediate_stages) == (3, 0.2, True)
    assert back.network_spec == fastlego.training.spec_from_network(net)
    # The spec builds the same network (fastlego.training.build_network), weights aside.
    rebuilt = fastlego.training.build_network(back.network_spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_training_checkpoint_of_a_custom_stack_loads(tmp_path):
    from fastlego.training import atomic_save, load_training_checkpoint, network_from_checkpoint, train
    run = tmp_path / "run"
    res = train(data="digits", resolution=8, bricks="4:w32p4h2:1,8:w32p8h2:1", batch_size=4, steps=1, max_images=8,
                outdir=str(run), progress=False, seed=3)
    ckpt = load_training_checkpoint(res.checkpoint)
    # Random non-zero weights in both networks of the checkpoint (one step leaves most near zero).
    for key, seed in (("ema", 1), ("model", 2)):
        net = fastlego.training.build_network(ckpt["network"])
        ckpt[key] = fastlego.testing.randomize_(net, seed=seed).state_dict()
    atomic_save(ckpt, res.checkpoint)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, labels = torch.tensor([0.3, 3.0]), torch.tensor([1, 7])
    for key in ("ema", "model"):
        loaded = load_checkpoint(res.checkpoint) if key == "ema" else load_checkpoint(res.checkpoint, key=key)
        reference = network_from_checkpoint(res.checkpoint, which=key)
        assert isinstance(loaded, fastlego.EDMPrecond) and not loaded.training
        assert loaded.network_spec == ckpt["network"] and loaded.model_type == "custom:4:w32p4h2:1,8:w32p8h2:1"
        assert_same_weights(loaded, reference)
        with fastlego.use_backend("reference"), torch.no_grad():
            want = reference(x, sigma, labels)
            assert want.abs().mean() > 1e-2 and torch.equal(loaded(x, sigma, labels), want)
    k = "model.model.1.blocks.0.attn.qkv.weight"   # key picks the network: "ema" and "model" differ
    assert not torch.equal(load_checkpoint(res.checkpoint).state_dict()[k],
                           load_checkpoint(res.checkpoint, key="model").state_dict()[k])
    # ... and saves again as a safetensors file of the same network.
    _round_trip(load_checkpoint(res.checkpoint), tmp_path / "from-run.safetensors", x, sigma, labels)
    with pytest.raises(KeyError, match="training checkpoint: its networks are 'ema'.*'model'.*key='net'"):
        load_checkpoint(res.checkpoint, key="net")
    # Its bare state dict has no stack: the error spells it, and model_type= with the heads loads it.
    torch.save(ckpt["ema"], tmp_path / "ema.pt")
    with pytest.raises(ValueError, match=r"custom brick stack.*model_type='4:w32p4h<HEADS>:1,8:w32p8h<HEADS>:1'"):
        load_checkpoint(tmp_path / "ema.pt")
    bare = load_checkpoint(tmp_path / "ema.pt", model_type="4:w32p4h2:1,8:w32p8h2:1", img_resolution=8)
    assert_same_weights(bare, load_checkpoint(res.checkpoint))
    assert bare.network_spec == dict(ckpt["network"], train_intermediate_stages=False)


def test_files_that_are_not_checkpoints_name_the_fix(tmp_path):
    from fastlego.training import train
    run = tmp_path / "run"
    train(data="digits", resolution=8, bricks="4:w32p4h2:1,8:w32p8h2:1", batch_size=4, steps=1, max_images=8,
          outdir=str(run), progress=False)
    ckpt = str(run / "checkpoint.pt")
    with pytest.raises(IsADirectoryError, match=f"training run's folder.*pass its checkpoint, '{ckpt}'"):
        load_checkpoint(run)
    for name in ("config.json", "metrics.jsonl"):
        with pytest.raises(ValueError, match=f"not a readable checkpoint.*pass its checkpoint, '{ckpt}'"):
            load_checkpoint(run / name)
    import zipfile
    with zipfile.ZipFile(tmp_path / "dataset.zip", "w") as z:
        z.writestr("00000/img00000000.png", b"not really a png")
    with pytest.raises(ValueError, match=r"not a readable checkpoint: a zip file but no torch.save archive.*"
                                         r"pass a release \.pkl, a fastlego training checkpoint"):
        load_checkpoint(tmp_path / "dataset.zip")
    torch.save({"step": 3, "note": "hello"}, tmp_path / "notes.pt")
    with pytest.raises(ValueError, match=r"entries \['note', 'step'\] but no network.*fastlego training checkpoint"):
        load_checkpoint(tmp_path / "notes.pt")
    newer = torch.load(ckpt, weights_only=True)
    newer["version"] = 99
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match="newer fastlego.*upgrade"):
        load_checkpoint(tmp_path / "newer.pt")
    pytest.importorskip("safetensors")
    import safetensors.torch as st
    net = load_checkpoint(ckpt)
    st.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "future.safetensors"),
                 metadata={checkpoint.SAFETENSORS_CONFIG_KEY: checkpoint.json.dumps(
                     dict(checkpoint.checkpoint_config(net), format_version=99, fastlego_version="9.9"))})
    with pytest.raises(ValueError, match=r"newer fastlego \(9\.9, format version 99 > 2\): upgrade"):
        load_checkpoint(tmp_path / "future.safetensors")
