"""Data: the PNG codec, the bundled digits, folder / zip datasets, the data order, grids."""

import json
import os
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch

from fastlego.data import (DataOrder, ImageDataset, center_crop_resize, decode_png, encode_png, float_to_uint8,
                           images_to_float, load_digits, make_grid, read_image, step_batches, to_device_async,
                           write_png)


# --------------------------------------------------------------------------------------------
# PNG codec
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (4, 9, 2), (6, 3, 3), (2, 5, 4)])
def test_png_round_trip(shape):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    out = decode_png(encode_png(img))
    expect = img if img.ndim == 3 else img[:, :, None]
    assert out.shape == expect.shape and out.dtype == np.uint8
    assert np.array_equal(out, expect)


def _filtered_png(img: np.ndarray, filters) -> bytes:
    """An independent PNG encoder that applies the given row filters (spec section 9.2)."""
    h, w, c = img.shape
    raw = bytearray()
    a = img.reshape(h, w * c).astype(np.int32)
    for y in range(h):
        f = filters[y % len(filters)]
        prev = a[y - 1] if y > 0 else np.zeros(w * c, np.int32)
        row = a[y]
        left = np.concatenate([np.zeros(c, np.int32), row[:-c]])
        upleft = np.concatenate([np.zeros(c, np.int32), prev[:-c]])
        if f == 0:
            pred = np.zeros_like(row)
        elif f == 1:
            pred = left
        elif f == 2:
            pred = prev
        elif f == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        raw.append(f)
        raw.extend(((row - pred) % 256).astype(np.uint8).tobytes())
    color = {1: 0, 3: 2, 4: 6}[c]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # Split the pixel data over two IDAT chunks: readers must concatenate them.
    z = zlib.compress(bytes(raw))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"tEXt", b"Comment\x00test") + chunk(b"IDAT", z[:7]) + chunk(b"IDAT", z[7:]) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_reader_undoes_every_row_filter(channels):
    rng = np.random.default_rng(channels)
    img = rng.integers(0, 256, size=(10, 6, channels), dtype=np.uint8)
    assert np.array_equal(decode_png(_filtered_png(img, [0, 1, 2, 3, 4])), img)
    assert np.array_equal(read_image(_filtered_png(img, [4, 3]), "x.png"), img)


def test_png_palette_and_errors():
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    raw = b"".join(b"\x00" + r.tobytes() for r in idx)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 8, 3, 0, 0, 0))
           + chunk(b"PLTE", palette.tobytes()) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    assert np.array_equal(decode_png(png), palette[idx])
    sixteen = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 16, 0, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00")) + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="Pillow"):
        decode_png(sixteen)
    with pytest.raises(ValueError, match="signature"):
        decode_png(b"GIF89a....")
    with pytest.raises(TypeError, match="uint8"):
        encode_png(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="C in 1..4"):
        encode_png(np.zeros((2, 2, 5), np.uint8))


# --------------------------------------------------------------------------------------------
# Bundled digits
# --------------------------------------------------------------------------------------------

def test_bundled_digits_are_the_real_data_set():
    x8, y = load_digits(8)
    assert x8.shape == (1797, 1, 8, 8) and x8.dtype == torch.uint8
    assert y.shape == (1797,) and torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    with np.load(os.path.join(os.path.dirname(__import__("fastlego").__file__), "data", "digits.npz")) as f:
        raw = f["images"]
    assert raw.max() == 16 and raw.min() == 0
    # 8x8 is the original, only rescaled from 0..16 to 0..255.
    assert torch.equal(x8[:, 0], torch.from_numpy(np.rint(raw * (255 / 16)).astype(np.uint8)))
    # The first digit of the UCI test set, a 0, exactly as the source csv holds it.
    first = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
             0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
    assert y[0] == 0 and raw[0].reshape(-1).tolist() == first
    x16, _ = load_digits(16)
    assert x16.shape == (1797, 1, 16, 16)
    # Upsampling keeps the mean brightness (bilinear weights sum to one; only edges differ a little).
    assert abs(x16.float().mean() - x8.float().mean()) < 2.0
    with pytest.raises(ValueError, match="multiple of 8"):
        load_digits(12)


def test_dataset_bundled_digits():
    ds = ImageDataset("digits", resolution=16)
    assert len(ds) == 1797 and ds.channels == 1 and ds.label_dim == 10 and ds.resolution == 16
    img, lab = ds[5]
    assert img.shape == (1, 16, 16) and lab.sum() == 1 and lab.argmax() == load_digits(8)[1][5]
    images, labels = ds.batch([0, 5, 7, 5])
    assert images.shape == (4, 1, 16, 16) and labels.shape == (4, 10)
    for j, i in enumerate([0, 5, 7, 5]):   # the label table's rows are the per-image labels
        assert torch.equal(images[j], ds[i][0]) and torch.equal(labels[j], ds[i][1])
    short = ImageDataset("digits", max_images=10)
    assert short.batch([9])[1].argmax() == load_digits(8)[1][9]
    assert ImageDataset("digits", use_labels=False).batch([3])[1].shape == (1, 0)
    assert ImageDataset("digits", use_labels=False).label_dim == 0
    assert len(ImageDataset("digits", max_images=10)) == 10


def _staged_batches_equal_host_batches(device):
    host = ImageDataset("digits", resolution=16)
    staged = ImageDataset("digits", resolution=16).to_device(device)
    assert staged.in_memory and staged.device.type == torch.device(device).type
    assert staged.nbytes == 1797 * 16 * 16 + 1797 * 10 * 4
    order = DataOrder(len(host), 64, seed=5, xflip=True)
    pairs = zip(step_batches(host, order, 28, 31), step_batches(staged, order, 28, 31))   # crosses an epoch
    for (s, im, lb, fl), (s2, im2, lb2, fl2) in pairs:
        assert s == s2 and torch.equal(fl, fl2) and fl2.device.type == "cpu"   # flips stay on the host
        assert im2.device.type == staged.device.type and lb2.device.type == staged.device.type
        assert torch.equal(im2.cpu(), im) and torch.equal(lb2.cpu(), lb)
        assert torch.equal(images_to_float(im2, fl).cpu(), images_to_float(im, fl))
    # indices as a list, a CPU tensor or a tensor of another integer type give the same batch
    a, b, c = staged.batch([3, 1, 3]), staged.batch(torch.tensor([3, 1, 3])), staged.batch(torch.tensor([3, 1, 3],
                                                                                                       dtype=torch.int32))
    assert all(torch.equal(x[0], a[0]) and torch.equal(x[1], a[1]) for x in (b, c))


def test_in_memory_dataset_staged_gives_the_host_batches():
    _staged_batches_equal_host_batches("cpu")
    x = torch.arange(6)
    assert torch.equal(to_device_async(x, "cpu"), x)
    assert ImageDataset("digits", use_labels=False).to_device("cpu").batch([2])[1].shape == (1, 0)


@pytest.mark.cuda
def test_in_memory_dataset_staged_on_the_gpu_gives_the_host_batches_without_a_sync():
    """Staged on a CUDA device, a step's batch (indices in, images and labels out, flipped to float)
    is the host's, and asks nothing of the host that waits for the device."""
    _staged_batches_equal_host_batches("cuda")
    staged = ImageDataset("digits", resolution=16).to_device("cuda")
    order = DataOrder(len(staged), 64, seed=5, xflip=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _, im, lb, fl in step_batches(staged, order, 0, 40):
            y = images_to_float(im, fl)
            lb = to_device_async(lb, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.is_cuda and lb.is_cuda and torch.isfinite(y).all()


# --------------------------------------------------------------------------------------------
# Folder and zip datasets
# --------------------------------------------------------------------------------------------

def _make_images(n=4):
    rng = np.random.default_rng(1)
    out = {}
    for i in range(n):
        h, w = (12, 20) if i % 2 == 0 else (20, 12)  # non-square both ways
        out[f"sub/img{i:02d}.png"] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return out


def test_center_crop_resize():
    img = torch.zeros(1, 4, 8, dtype=torch.uint8)
    img[:, :, 2:6] = 200  # the centre 4x4 square
    assert torch.equal(center_crop_resize(img, 4), torch.full((1, 4, 4), 200, dtype=torch.uint8))
    tall = torch.arange(6 * 2, dtype=torch.uint8).reshape(1, 6, 2)
    assert torch.equal(center_crop_resize(tall, 2), tall[:, 2:4])
    big = torch.full((3, 9, 9), 77, dtype=torch.uint8)
    assert torch.equal(center_crop_resize(big, 3), torch.full((3, 3, 3), 77, dtype=torch.uint8))


@pytest.mark.parametrize("kind", ["dir", "zip"])
def test_folder_and_zip_datasets(tmp_path, kind):
    imgs = _make_images()
    labels = {"labels": [[name, i % 3] for i, name in enumerate(sorted(imgs))]}
    if kind == "dir":
        root = tmp_path / "ds"
        for name, a in imgs.items():
            (root / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
            write_png(str(root / name), a)
        (root / "dataset.json").write_text(json.dumps(labels))
        path = str(root)
    else:
        path = str(tmp_path / "ds.zip")
        with zipfile.ZipFile(path, "w") as z:
            for name, a in imgs.items():
                z.writestr(name, encode_png(a))
            z.writestr("dataset.json", json.dumps(labels))
    ds = ImageDataset(path, resolution=8)
    assert len(ds) == 4 and ds.channels == 3 and ds.label_dim == 3 and ds.resolution == 8
    for i, name in enumerate(sorted(imgs)):
        img, lab = ds[i]
        expect = center_crop_resize(torch.from_numpy(imgs[name]).permute(2, 0, 1), 8)
        assert torch.equal(img, expect)
        assert lab.tolist() == [1.0 if k == i % 3 else 0.0 for k in range(3)]
    gray = ImageDataset(path, resolution=8, channels=1, use_labels=False)
    assert gray[0][0].shape == (1, 8, 8) and gray.label_dim == 0
    # Every image must be labelled when labels are used.
    bad = {"labels": labels["labels"][:2]}
    if kind == "dir":
        (tmp_path / "ds" / "dataset.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="no label for 2 image"):
            ImageDataset(path)


def test_only_in_memory_datasets_are_staged(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    write_png(str(root / "a.png"), np.zeros((8, 8, 3), dtype=np.uint8))
    ds = ImageDataset(str(root))
    assert not ds.in_memory and ds.nbytes is None and ds.device == torch.device("cpu")
    with pytest.raises(ValueError, match="only an in-memory dataset.*workers > 0"):
        ds.to_device("cpu")


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="digits"):
        ImageDataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageDataset(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="neither a folder nor a zip"):
        ImageDataset(str(tmp_path / "x.txt"))
    (tmp_path / "jpg").mkdir()
    (tmp_path / "jpg" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0not really")
    try:
        import PIL  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install pillow"):
            ImageDataset(str(tmp_path / "jpg"))


# --------------------------------------------------------------------------------------------
# Data order, conversions, grids
# --------------------------------------------------------------------------------------------

def test_data_order_is_a_function_of_step():
    order = DataOrder(10, 4, seed=3, xflip=True)
    stream = torch.cat([order.global_batch(s)[0] for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # a fresh permutation each epoch
    again = DataOrder(10, 4, seed=3, xflip=True)
    for s in (4, 0, 2):  # any order of asking, same answer
        i1, f1 = order.global_batch(s)
        i2, f2 = again.global_batch(s)
        assert torch.equal(i1, i2) and torch.equal(f1, f2)
    # Ranks take contiguous slices of the global batch.
    idx, flips = order.global_batch(3)
    parts = [order.rank_batch(3, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), idx) and torch.equal(torch.cat([p[1] for p in parts]), flips)
    assert not DataOrder(10, 4, seed=3).global_batch(0)[1].any()  # no flips unless asked
    assert not torch.equal(DataOrder(10, 4, seed=4).global_batch(0)[0], order.global_batch(0)[0])


def test_conversions_and_grid():
    u8 = torch.tensor([[[[0, 255], [128, 64]]]], dtype=torch.uint8)
    x = images_to_float(u8)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(images_to_float(u8, torch.tensor([True])), x.flip(3))
    assert torch.equal(float_to_uint8(x)[..., 0], u8[:, 0])
    imgs = torch.arange(5 * 2 * 3, dtype=torch.uint8).reshape(5, 2, 3, 1)
    grid = make_grid(imgs, columns=2, pad=1, pad_value=9)
    assert grid.shape == (3 * 2 + 4, 2 * 3 + 3, 1)
    assert torch.equal(grid[1:3, 1:4], imgs[0]) and torch.equal(grid[1:3, 5:8], imgs[1])
    assert torch.equal(grid[7:9, 1:4], imgs[4]) and (grid[7:9, 5:8] == 9).all() and (grid[0] == 9).all()
