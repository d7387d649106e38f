"""Training data: the bundled digits, image folders and EDM-style zips, PNG reading and writing.

Images travel as uint8 tensors `(C, H, W)` (0..255) until the training step turns them into floats
in [-1, 1]. Labels are float vectors of length `label_dim` (one-hot, or all-zero for "no label").

- `load_digits(resolution)`: 1797 real 8x8 handwritten digits (UCI, via scikit-learn; see
  `fastlego/data/DIGITS_LICENSE.txt`) shipped inside the package, upsampled at load time.
- `ImageDataset(path, resolution)`: a folder of images or an EDM-style zip (image files plus an
  optional `dataset.json` holding `{"labels": [[fname, label], ...]}`); every image is
  center-cropped to a square and resized to `resolution`.
- `write_png` / `decode_png`: a small pure-zlib PNG codec (8-bit, non-interlaced), so no imaging
  library is needed; Pillow, when installed, reads every other format.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
BUNDLED = ("digits",)


# --------------------------------------------------------------------------------------------
# PNG codec (8-bit, non-interlaced): enough for what fastlego writes and for most datasets
# --------------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (gray, gray+alpha, RGB, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image, compress_level: int = 6) -> bytes:
    """PNG bytes of a uint8 image `(H, W)` or `(H, W, C)` with C in 1..4 (no filtering: rows
    are prefixed with filter byte 0 and deflated)."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.dtype != np.uint8:
        raise TypeError(f"encode_png takes uint8 pixels (0..255), got {a.dtype}: convert with "
                        f"(x * 127.5 + 128).clip(0, 255).astype(np.uint8) or similar")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in _COLOR_TYPES or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"encode_png takes an (H, W) or (H, W, C) image with C in 1..4, got shape {a.shape}")
    h, w, c = a.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), np.ascontiguousarray(a).reshape(h, w * c)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPES[c], 0, 0, 0)
    return (_PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), compress_level))
            + _chunk(b"IEND", b""))


def write_png(path: str, image, compress_level: int = 6) -> None:
    """Write a uint8 `(H, W)` or `(H, W, C)` image as a PNG file."""
    with open(path, "wb") as f:
        f.write(encode_png(image, compress_level))


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a.astype(np.int16) + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c)).astype(np.uint8)


def decode_png(data: bytes) -> np.ndarray:
    """A PNG's pixels as uint8 `(H, W, C)`: 8-bit gray / gray+alpha / RGB / RGBA / palette,
    non-interlaced (the five row filters undone). Other PNGs raise with a hint to install Pillow."""
    if data[:8] != _PNG_SIGNATURE:
        raise ValueError("not a PNG file (bad signature)")
    pos, idat, palette, header = 8, [], None, None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without an IHDR chunk")
    w, h, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color)
    if depth != 8 or interlace != 0 or channels is None:
        raise ValueError(f"this PNG (bit depth {depth}, colour type {color}, interlace {interlace}) needs Pillow: "
                         f"pip install pillow (the built-in reader takes 8-bit non-interlaced PNGs)")
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    stride = w * channels
    if raw.size != h * (stride + 1):
        raise ValueError(f"corrupt PNG: {raw.size} bytes of pixel data for a {w}x{h}x{channels} image")
    rows = raw.reshape(h, stride + 1)
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    bpp = channels
    for y in range(h):
        kind, line = rows[y, 0], rows[y, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 2:
            cur = (line + prev).astype(np.uint8)
        elif kind in (1, 3, 4):
            # Sub / Average / Paeth depend on the already-decoded byte bpp to the left: go pixel by pixel.
            cur = np.zeros(stride, np.uint8)
            for x in range(0, stride, bpp):
                left = cur[x - bpp:x] if x >= bpp else np.zeros(bpp, np.uint8)
                up = prev[x:x + bpp]
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = ((left.astype(np.uint16) + up) // 2).astype(np.uint8)
                else:
                    upleft = prev[x - bpp:x] if x >= bpp else np.zeros(bpp, np.uint8)
                    pred = _paeth(left, up, upleft)
                cur[x:x + bpp] = line[x:x + bpp] + pred
        else:
            raise ValueError(f"corrupt PNG: unknown row filter {kind}")
        out[y] = cur
        prev = cur
    img = out.reshape(h, w, channels)
    if color == 3:
        if palette is None:
            raise ValueError("corrupt PNG: palette image without a PLTE chunk")
        img = palette[img[:, :, 0]]
    return img


def read_image(data: bytes, name: str = "") -> np.ndarray:
    """Decode image bytes to uint8 `(H, W, C)`: Pillow when installed, else the built-in PNG reader.
    Both keep the file's channels (gray, gray+alpha, RGB, RGBA; palettes become RGB), so an image
    reads the same with or without Pillow; `to_channels` then makes the channels training uses."""
    try:
        from PIL import Image
    except ImportError:
        if not name.lower().endswith(".png") and data[:8] != _PNG_SIGNATURE:
            raise ValueError(f"{name or 'image'}: only PNG files can be read without Pillow; "
                             f"pip install pillow for other formats") from None
        return decode_png(data)
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "LA", "RGB", "RGBA"):
            im = im.convert("L" if im.mode in ("1", "I", "I;16", "F") else "RGB")
        a = np.asarray(im)
    return a[:, :, None] if a.ndim == 2 else a


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (H, W, c) -> (H, W, channels): drop alpha, gray <-> RGB (ITU-R 601 luma)."""
    c = img.shape[2]
    if c in (2, 4):
        img, c = img[:, :, :c - 1], c - 1
    if c == channels:
        return img
    if channels == 3:
        return np.repeat(img, 3, axis=2)
    if channels == 1:
        luma = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, :, None]
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels (use 1 or 3)")


def center_crop_resize(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, r, r): the centered min(H, W) square, resized with an
    antialiased bilinear filter (area-like when shrinking)."""
    _, h, w = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[:, top:top + s, left:left + s]
    if s == resolution:
        return img.contiguous()
    x = F.interpolate(img[None].float(), size=(resolution, resolution), mode="bilinear",
                      antialias=s > resolution, align_corners=False)[0]
    return x.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

def load_digits(resolution: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits: uint8 images (1797, 1, r, r), white strokes on black, and int64 labels.

    The 8x8 originals hold counts 0..16; they are scaled to 0..255 and upsampled with a bilinear
    filter to `resolution` (a multiple of 8: 8, 16, 32, ...)."""
    if resolution < 8 or resolution % 8:
        raise ValueError(f"digits resolution must be a multiple of 8 (8, 16, 32, ...), got {resolution}")
    with np.load(DIGITS_PATH) as f:
        images, labels = f["images"], f["labels"]
    x = torch.from_numpy(images.astype(np.float32) * (255.0 / 16.0))[:, None]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8), torch.from_numpy(labels.astype(np.int64))


class ImageDataset(torch.utils.data.Dataset):
    """Square uint8 images `(C, r, r)` and float labels from the bundled digits, a folder or a zip.

    `path`: "digits" (bundled), a directory (searched recursively) or a `.zip` (EDM's
    dataset_tool layout). Labels come from `dataset.json` (`{"labels": [[fname, label], ...]}`,
    label an int class id or a list of floats) when `use_labels`; images without one get an
    all-zero label. `channels` None: 1 if the first image is gray, else 3. `max_images` keeps the
    first N files (sorted by name). Horizontal flips are applied by the trainer, not here.
    """

    def __init__(self, path: str, resolution: Optional[int] = None, use_labels: bool = True,
                 channels: Optional[int] = None, max_images: Optional[int] = None, cache_bytes: int = 1 << 30):
        self.path = str(path)
        self.use_labels = use_labels
        self._zip: Optional[zipfile.ZipFile] = None
        # Decoded images are kept up to `cache_bytes` per process (each DataLoader worker has its
        # own cache), so a large dataset does not grow memory without bound.
        self._cache: Dict[int, torch.Tensor] = {}
        self._cache_room = int(cache_bytes)
        self._memory: Optional[torch.Tensor] = None
        self._label_table: Optional[torch.Tensor] = None   # in-memory datasets: every label, (N, label_dim)
        if self.path in BUNDLED:
            res = 16 if resolution is None else resolution
            images, ids = load_digits(res)
            if channels not in (None, 1):
                images = images.expand(-1, channels, -1, -1).contiguous()
            self._memory, self.names = images, [f"digits/{i:04d}" for i in range(len(images))]
            self.resolution, self.channels = res, images.shape[1]
            self.label_dim = 10 if use_labels else 0
            self._label_values = [int(i) for i in ids]
        else:
            self._open_files()
            if max_images is not None:
                self.names = self.names[:max_images]
            first = self._decode(0)
            self.channels = channels or (1 if first.shape[2] in (1, 2) else 3)
            self.resolution = resolution or min(first.shape[:2])
            self._label_values = self._read_labels() if use_labels else None
            self.label_dim = self._infer_label_dim(self._label_values)
        if max_images is not None and self._memory is not None:
            self._memory, self.names = self._memory[:max_images], self.names[:max_images]
            self._label_values = self._label_values[:max_images]
        if len(self.names) == 0:
            raise ValueError(f"{self.path}: no images found")
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    # -- files ----------------------------------------------------------------------------------
    def _open_files(self) -> None:
        if os.path.isdir(self.path):
            names = []
            for root, _, files in os.walk(self.path):
                for f in files:
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        names.append(os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, "/"))
            self._kind = "dir"
        elif os.path.isfile(self.path) and zipfile.is_zipfile(self.path):
            with zipfile.ZipFile(self.path) as z:
                names = [n for n in z.namelist() if n.lower().endswith(IMAGE_EXTENSIONS)]
            self._kind = "zip"
        elif not os.path.exists(self.path):
            raise FileNotFoundError(f"dataset {self.path!r} does not exist: pass a folder of images, an "
                                    f"EDM-style .zip, or 'digits' for the bundled handwritten digits")
        else:
            raise ValueError(f"dataset {self.path!r} is neither a folder nor a zip file")
        self.names = sorted(names)
        if not self.names:
            raise ValueError(f"{self.path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")

    def _read_bytes(self, name: str) -> Optional[bytes]:
        if self._kind == "dir":
            full = os.path.join(self.path, name)
            if not os.path.exists(full):
                return None
            with open(full, "rb") as f:
                return f.read()
        if self._zip is None:  # opened lazily: one handle per DataLoader worker process
            self._zip = zipfile.ZipFile(self.path)
        try:
            return self._zip.read(name)
        except KeyError:
            return None

    def _decode(self, index: int) -> np.ndarray:
        name = self.names[index]
        return read_image(self._read_bytes(name), name)

    def _read_labels(self) -> Optional[list]:
        data = self._read_bytes("dataset.json")
        if data is None:
            return None
        table = json.loads(data).get("labels")
        if table is None:
            return None
        by_name = {str(fname).replace("\\", "/"): label for fname, label in table}
        missing = [n for n in self.names if n not in by_name]
        if missing:
            raise ValueError(f"{self.path}: dataset.json has no label for {len(missing)} image(s), e.g. "
                             f"{missing[0]!r}; label every image or pass use_labels=False")
        return [by_name[n] for n in self.names]

    @staticmethod
    def _infer_label_dim(values) -> int:
        if values is None:
            return 0
        if all(isinstance(v, (int, np.integer)) for v in values):
            if min(values) < 0:
                raise ValueError("dataset.json class ids must be >= 0")
            return int(max(values)) + 1
        lengths = {len(v) for v in values}
        if len(lengths) != 1:
            raise ValueError(f"dataset.json labels must all be class ids or float vectors of one length, got lengths {sorted(lengths)}")
        return lengths.pop()

    def __getstate__(self):  # picklable for DataLoader workers: zip handles are reopened
        state = dict(self.__dict__)
        state["_zip"] = None
        return state

    # -- items --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def image(self, index: int) -> torch.Tensor:
        """uint8 (C, r, r)."""
        if self._memory is not None:
            return self._memory[index]
        if index in self._cache:
            return self._cache[index]
        img = to_channels(self._decode(index), self.channels)
        img = center_crop_resize(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), self.resolution)
        if img.nbytes <= self._cache_room:
            self._cache[index] = img
            self._cache_room -= img.nbytes
        return img

    def label(self, index: int) -> torch.Tensor:
        """float (label_dim,): one-hot for class ids, the vector itself otherwise."""
        out = torch.zeros(self.label_dim)
        if self.label_dim:
            v = self._label_values[index]
            if isinstance(v, (int, np.integer)):
                out[int(v)] = 1
            else:
                out[:] = torch.tensor(v, dtype=torch.float32)
        return out

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.image(index), self.label(index)

    @property
    def in_memory(self) -> bool:
        """Whether every image is held as one tensor (the bundled digits), so that `batch` is one
        gather and `to_device` can stage the whole dataset."""
        return self._memory is not None

    @property
    def device(self) -> torch.device:
        """Where `batch` returns its tensors: the CPU unless `to_device` staged the dataset."""
        return self._memory.device if self._memory is not None else torch.device("cpu")

    @property
    def nbytes(self) -> Optional[int]:
        """Bytes of the in-memory images and labels (None for file datasets)."""
        if self._memory is None:
            return None
        return self._memory.nbytes + len(self) * self.label_dim * 4

    def to_device(self, device) -> "ImageDataset":
        """Stage an in-memory dataset on `device` (images and the label table), so that a training
        step's batch is one gather there and nothing crosses the host-device link per step; the
        batches are the same values as on the host. File datasets are refused: they decode per
        image (use DataLoader workers for them)."""
        if self._memory is None:
            raise ValueError(f"{self.path}: only an in-memory dataset (the bundled digits) can be staged on a "
                             f"device; a folder or zip decodes its images as it goes (pass workers > 0 instead)")
        device = torch.device(device)
        self._memory = self._memory.to(device)
        self._label_table = self._labels_in_memory().to(device)
        return self

    def _labels_in_memory(self) -> torch.Tensor:
        if self._label_table is None:
            self._label_table = torch.stack([self.label(i) for i in range(len(self))]) if len(self) \
                else torch.zeros(0, self.label_dim)
        return self._label_table

    def batch(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, C, r, r) and float (B, label_dim) for these indices (a sequence or a CPU
        tensor), on the dataset's `device`."""
        if self._memory is not None:   # one gather each from the image and label tables
            idx = to_device_async(torch.as_tensor(indices, dtype=torch.long), self._memory.device)
            return self._memory[idx], self._labels_in_memory()[idx]
        items = [self[int(i)] for i in indices]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def describe(self) -> str:
        labels = f"{self.label_dim} label dims" if self.label_dim else "unlabelled"
        return f"{self.path}: {len(self)} images, {self.channels}x{self.resolution}x{self.resolution}, {labels}"


# --------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, step), so that a resumed run sees the same batches
# --------------------------------------------------------------------------------------------

class DataOrder:
    """Which images (and which flips) each training step uses.

    Epoch `e` is a permutation of the dataset drawn from `seed` and `e`; step `s` takes the global
    batch of `batch_size` consecutive entries starting at `s * batch_size` of the endless stream
    of epochs; rank `r` of `world` takes its contiguous `batch_size / world` slice. Nothing here
    has state: resuming at step s needs only s.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int = 0, shuffle: bool = True, xflip: bool = False):
        if num_images < 1:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.seed, self.shuffle, self.xflip = num_images, batch_size, seed, shuffle, xflip
        self._epoch_cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _epoch(self, e: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if e not in self._epoch_cache:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + e) & 0x7FFF_FFFF_FFFF_FFFF)
            perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            flips = (torch.rand(self.n, generator=g) < 0.5) if self.xflip else torch.zeros(self.n, dtype=torch.bool)
            if len(self._epoch_cache) > 4:
                self._epoch_cache.clear()
            self._epoch_cache[e] = (perm, flips)
        return self._epoch_cache[e]

    def global_batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(indices, flips) of the whole batch of this step."""
        start = step * self.batch_size
        idx, flip = [], []
        pos = start
        while pos < start + self.batch_size:
            e, off = divmod(pos, self.n)
            take = min(self.n - off, start + self.batch_size - pos)
            perm, flips = self._epoch(e)
            idx.append(perm[off:off + take])
            flip.append(flips[perm[off:off + take]])
            pos += take
        return torch.cat(idx), torch.cat(flip)

    def rank_batch(self, step: int, rank: int = 0, world: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        idx, flip = self.global_batch(step)
        per = self.batch_size // world
        return idx[rank * per:(rank + 1) * per], flip[rank * per:(rank + 1) * per]


class _StepBatches(torch.utils.data.Sampler):
    """Batch sampler for a DataLoader: this rank's indices for steps start, start+1, ..."""

    def __init__(self, order: DataOrder, start_step: int, total_steps: int, rank: int, world: int):
        self.order, self.start, self.total, self.rank, self.world = order, start_step, total_steps, rank, world

    def __iter__(self):
        for step in range(self.start, self.total):
            yield self.order.rank_batch(step, self.rank, self.world)[0].tolist()

    def __len__(self):
        return max(0, self.total - self.start)


def _collate(items: List[Tuple[torch.Tensor, torch.Tensor]]):
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def step_batches(dataset: ImageDataset, order: DataOrder, start_step: int, total_steps: int,
                 rank: int = 0, world: int = 1, workers: int = 0, pin_memory: bool = False):
    """Iterate (step, uint8 images, float labels, flips) for steps start..total-1 of this rank.

    In-memory datasets are indexed directly (on the device they are staged on); files are
    decoded by a DataLoader with `workers` processes (the order is still `order`'s), into
    pinned memory with `pin_memory` (so that the copy to a CUDA device does not block). Flips
    stay on the host."""
    if dataset.in_memory or workers == 0:
        for step in range(start_step, total_steps):
            idx, flips = order.rank_batch(step, rank, world)
            images, labels = dataset.batch(idx)
            yield step, images, labels, flips
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_StepBatches(order, start_step, total_steps, rank, world),
                                         num_workers=workers, collate_fn=_collate, persistent_workers=False,
                                         pin_memory=pin_memory)
    for step, (images, labels) in zip(range(start_step, total_steps), loader):
        yield step, images, labels, order.rank_batch(step, rank, world)[1]


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without blocking the host: to a CUDA device through pinned
    memory (a copy from pageable memory waits for the device's queue), elsewhere as `.to`."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def images_to_float(images: torch.Tensor, flips: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 (B, C, H, W) in 0..255 -> float32 in [-1, 1] (x / 127.5 - 1), flipped where `flips`
    (a bool (B,) tensor; kept on the host by the trainer, so that testing it needs no sync)."""
    x = images.to(torch.float32) / 127.5 - 1
    if flips is not None and bool(flips.any()):
        x = torch.where(to_device_async(flips, x.device).reshape(-1, 1, 1, 1), x.flip(3), x)
    return x


def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), EDM's rounding `x * 127.5 + 128`."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def make_grid(images: torch.Tensor, columns: Optional[int] = None, pad: int = 0, pad_value: int = 0) -> torch.Tensor:
    """uint8 (N, H, W, C) -> one uint8 image (rows*H + pad..., cols*W + pad..., C), row-major."""
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = (n + cols - 1) // cols
    grid = torch.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), pad_value, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top:top + h, left:left + w] = images[i]
    return grid
