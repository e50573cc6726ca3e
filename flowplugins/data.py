"""Image data sets for training flows: integer pixel levels, fixed splits, dequantization.

Every loader returns an :class:`ImageData`: ``train`` / ``val`` / ``test`` splits of integer
pixel levels ``k ∈ {0, …, n_levels − 1}`` stored as ``uint8`` tensors ``(N, C, H, W)`` with
integer class labels ``(N,)``. The validation split is carved from the training images, so a
checkpoint can be chosen without ever looking at the test split. Splits depend only on the data
(a fixed :class:`numpy.random.RandomState` permutation), never on the training seed.

Data sets (the ``--data`` values of ``flowplugins train``):

* ``digits`` (default): scikit-learn's bundled 8x8 digits, 1,797 images with 17 grey levels
  (0..16, so ``n_levels = 17``; a uniform model scores ``log2 17 = 4.09`` bits/dim). A fixed
  1,500 / 297 train/test split; 150 of the 1,500 training images are held out for validation.
* ``mnist``: the idx-ubyte files of MNIST under ``ROOT/MNIST/raw`` (torchvision's layout),
  fetched by torchvision with ``download=True``.
* ``cifar10``: the python pickle batches under ``ROOT/cifar-10-batches-py``, fetched by
  torchvision with ``download=True``.
* ``folder:PATH``: every image under ``PATH`` read with PIL; sub-folders name the classes.

Dequantization (Theis et al., arXiv:1511.01844; Ho et al., arXiv:1902.00275 §3.1):
``x = (k + u) / n_levels`` with ``u ~ U[0, 1)^D`` turns discrete levels into data in ``[0, 1)``;
for any density ``p`` on ``[0, 1)^D``, ``E_u[log p(x)] − D log n_levels`` is a lower bound on
the discrete log-likelihood, so :func:`bits_per_dim` below is an upper bound on the discrete
model's bits per dimension.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DataError",
    "DataNotFoundError",
    "ImageSplit",
    "ImageData",
    "DATASETS",
    "load_data",
    "load_digits",
    "load_mnist",
    "load_cifar10",
    "load_folder",
    "read_idx",
    "split_indices",
    "dequantize",
    "levels_to_unit",
    "unit_to_levels",
    "bits_per_dim",
    "EpochShuffleSampler",
    "batch_loader",
]

#: Seed of the permutation that fixes every split; independent of the training seed.
SPLIT_SEED = 20240501
DATASETS = ("digits", "mnist", "cifar10", "folder:PATH")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DataError(ValueError):
    """A data set name, file or option is invalid."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data set's files are missing; the message says how to get them."""


@dataclass
class ImageSplit:
    """One split: integer pixel levels ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise DataError(f"ImageSplit: images must be (N, C, H, W); got {tuple(self.images.shape)}")
        if self.labels.shape != self.images.shape[:1]:
            raise DataError(
                f"ImageSplit: labels must have shape ({self.images.shape[0]},); "
                f"got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Sequence[int] | Tensor) -> "ImageSplit":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSplit(self.images[index], self.labels[index])


@dataclass
class ImageData:
    """A data set split three ways, with what a model needs to know about it."""

    name: str
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    n_levels: int
    num_classes: int

    @property
    def event_shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.train.images.shape[1:])  # type: ignore[return-value]

    def describe(self) -> Dict[str, object]:
        """Plain-data summary (stored in checkpoints and metrics)."""
        return {
            "name": self.name,
            "event_shape": list(self.event_shape),
            "n_levels": self.n_levels,
            "num_classes": self.num_classes,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
        }


# --------------------------------------------------------------------------- splitting
def split_indices(n: int, sizes: Sequence[int], seed: int = SPLIT_SEED) -> List[np.ndarray]:
    """Split ``range(n)`` by a fixed permutation into consecutive parts of the given sizes.

    The last size may be ``-1`` for "the rest". ``RandomState`` is used because its stream is
    frozen across numpy versions, so the split never changes under an upgrade.

    Raises:
        DataError: if the sizes do not fit in ``n``.
    """
    sizes = list(sizes)
    if sizes and sizes[-1] == -1:
        sizes[-1] = n - sum(sizes[:-1])
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise DataError(f"split_indices: sizes {sizes} do not fit in {n} items")
    perm = np.random.RandomState(seed).permutation(n)
    out, start = [], 0
    for s in sizes:
        out.append(np.sort(perm[start:start + s]))
        start += s
    return out


def _carve_val(train: ImageSplit, val_size: int) -> Tuple[ImageSplit, ImageSplit]:
    if not 0 < val_size < len(train):
        raise DataError(
            f"validation split: val_size must be in [1, {len(train) - 1}] for {len(train)} "
            f"training images; got {val_size}"
        )
    val_idx, train_idx = split_indices(len(train), [val_size, -1], seed=SPLIT_SEED + 1)
    return train.subset(train_idx), train.subset(val_idx)


def _default_val_size(n_train: int, val_size: Optional[int]) -> int:
    return int(val_size) if val_size is not None else max(1, round(0.1 * n_train))


# --------------------------------------------------------------------------- loaders
def load_digits(val_size: Optional[int] = 150) -> ImageData:
    """scikit-learn's bundled 8x8 digits: 17 levels, fixed 1,500/297 train/test split.

    Shapes:
        images: (N, 1, 8, 8) uint8 in 0..16; labels: (N,)

    Example:
        >>> data = load_digits()
        >>> len(data.train), len(data.val), len(data.test), data.n_levels
        (1350, 150, 297, 17)
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = split_indices(len(images), [1500, 297])
    full = ImageSplit(images, labels)
    train, val = _carve_val(full.subset(train_idx), _default_val_size(1500, val_size))
    return ImageData("digits", train, val, full.subset(test_idx), n_levels=17, num_classes=10)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx-ubyte file (the MNIST format; ``.gz`` accepted).

    Raises:
        DataError: if the file is not a valid unsigned-byte idx file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"read_idx: {path} is not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"read_idx: {path} is truncated in its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(shape)
    if len(raw) - header != count:
        raise DataError(
            f"read_idx: {path} should hold {count} bytes of data for shape {shape}; "
            f"has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(raw: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (raw / name).is_file():
            return raw / name
    return None


def load_mnist(root: str | os.PathLike = "data", download: bool = False,
               val_size: Optional[int] = 5000) -> ImageData:
    """MNIST from ``ROOT/MNIST/raw`` idx-ubyte files: 60,000 train (less validation), 10,000 test.

    Raises:
        DataNotFoundError: when the files are missing and ``download`` is false, or the download
            fails; the message gives the command that fetches them.
    """
    raw = Path(root) / "MNIST" / "raw"
    stems = {
        "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
    }
    if download and any(_find(raw, s) is None for s in stems.values()):
        _torchvision_download("mnist", root)
    files = {k: _find(raw, s) for k, s in stems.items()}
    missing = [stems[k] for k, f in files.items() if f is None]
    if missing:
        raise DataNotFoundError(
            f"MNIST: missing {', '.join(missing)} under {raw}. Fetch them with "
            f"`flowplugins train --data mnist --data-root {root} --download` (needs network), "
            f"or copy the four idx-ubyte files (optionally .gz) there."
        )
    arrays = {k: read_idx(f) for k, f in files.items()}
    splits = {}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise DataError(
                f"MNIST: {part} images {images.shape} and labels {labels.shape} do not match"
            )
        splits[part] = ImageSplit(
            torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
        )
    train, val = _carve_val(splits["train"], _default_val_size(len(splits["train"]), val_size))
    return ImageData("mnist", train, val, splits["test"], n_levels=256, num_classes=10)


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as fh:
        try:
            # The CIFAR-10 batches are pickles by design; only read files the user pointed at.
            batch = pickle.load(fh, encoding="bytes")
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
            raise DataError(f"CIFAR-10: {path} is not a readable CIFAR-10 batch ({err})") from err
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    labels = batch.get(b"labels", batch.get("labels")) if isinstance(batch, dict) else None
    if data is None or labels is None:
        raise DataError(f"CIFAR-10: {path} has no 'data'/'labels' entries")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
        raise DataError(
            f"CIFAR-10: {path} must hold data (N, 3072) and N labels; got {data.shape}, "
            f"{len(labels)} labels"
        )
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10(root: str | os.PathLike = "data", download: bool = False,
                 val_size: Optional[int] = 5000) -> ImageData:
    """CIFAR-10 from the python pickle batches under ``ROOT/cifar-10-batches-py``.

    Raises:
        DataNotFoundError: when the batches are missing and ``download`` is false, or the
            download fails; the message gives the command that fetches them.
    """
    folder = Path(root) / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if download and any(not (folder / n).is_file() for n in names):
        _torchvision_download("cifar10", root)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10: missing {', '.join(missing)} under {folder}. Fetch them with "
            f"`flowplugins train --data cifar10 --data-root {root} --download` (needs network), "
            f"or unpack cifar-10-python.tar.gz there."
        )
    parts = [_read_cifar_batch(folder / n) for n in names[:5]]
    train = ImageSplit(
        torch.from_numpy(np.concatenate([p[0] for p in parts])),
        torch.from_numpy(np.concatenate([p[1] for p in parts])),
    )
    test_x, test_y = _read_cifar_batch(folder / "test_batch")
    test = ImageSplit(torch.from_numpy(test_x), torch.from_numpy(test_y))
    train, val = _carve_val(train, _default_val_size(len(train), val_size))
    return ImageData("cifar10", train, val, test, n_levels=256, num_classes=10)


def _torchvision_download(name: str, root: str | os.PathLike) -> None:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception as err:  # noqa: BLE001 - network errors come in many types
        raise DataNotFoundError(
            f"{name}: download into {root} failed ({type(err).__name__}: {err}). Without network, "
            f"copy the files by hand (see `flowplugins train --help`)."
        ) from err


def load_folder(path: str | os.PathLike, val_fraction: float = 0.1,
                test_fraction: float = 0.1) -> ImageData:
    """Every image file under ``path`` (8-bit, all the same size), read with PIL.

    Images are labelled by the folder that holds them, relative to ``path`` (sorted names →
    0, 1, …; images directly in ``path`` count as the folder ``"."``). Grey-scale data sets (every image mode ``L``/``1``/``P``
    without colour) load as one channel, anything else as RGB. A fixed permutation puts
    ``test_fraction`` of the images in the test split and ``val_fraction`` in validation.

    Raises:
        DataNotFoundError: if ``path`` does not exist or holds no images.
        DataError: if the images differ in size, or the split leaves a part empty.
    """
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise DataNotFoundError(f"folder data: {root} is not a directory")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )
    if not files:
        raise DataNotFoundError(
            f"folder data: no image files ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}"
        )
    def group(p: Path) -> str:
        return p.parent.relative_to(root).as_posix()

    class_index = {c: i for i, c in enumerate(sorted({group(p) for p in files}))}
    opened = []
    for p in files:
        with Image.open(p) as im:
            im.load()
            opened.append(im.copy())
    grey = all(im.mode in ("L", "1", "I;16") or (im.mode == "P" and _palette_is_grey(im)) for im in opened)
    arrays = []
    for p, im in zip(files, opened):
        arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
        arr = arr[None] if grey else arr.transpose(2, 0, 1)
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(
                f"folder data: every image must have the same size; {p} is "
                f"{arr.shape[2]}x{arr.shape[1]}, {files[0]} is {arrays[0].shape[2]}x{arrays[0].shape[1]}"
            )
        arrays.append(arr)
    labels = [class_index[group(p)] for p in files]
    full = ImageSplit(torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.long))
    n = len(full)
    n_test = max(1, round(test_fraction * n))
    n_val = max(1, round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise DataError(f"folder data: {n} images in {root} are too few for train/val/test splits")
    test_idx, val_idx, train_idx = split_indices(n, [n_test, n_val, -1])
    return ImageData(
        f"folder:{root}", full.subset(train_idx), full.subset(val_idx), full.subset(test_idx),
        n_levels=256, num_classes=max(1, max(labels) + 1),
    )


def _palette_is_grey(im) -> bool:
    rgb = im.convert("RGB")
    arr = np.asarray(rgb)
    return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())


def load_data(name: str = "digits", root: str | os.PathLike = "data", download: bool = False,
              val_size: Optional[int] = None) -> ImageData:
    """Load a data set by its ``--data`` name: ``digits``, ``mnist``, ``cifar10`` or ``folder:PATH``.

    Raises:
        DataError: for an unknown name; :class:`DataNotFoundError` when files are missing.
    """
    if name == "digits":
        return load_digits(val_size=150 if val_size is None else val_size)
    if name == "mnist":
        return load_mnist(root, download, val_size=5000 if val_size is None else val_size)
    if name == "cifar10":
        return load_cifar10(root, download, val_size=5000 if val_size is None else val_size)
    if name.startswith("folder:"):
        path = name[len("folder:"):]
        if not path:
            raise DataError("data: 'folder:' needs a path, e.g. folder:./my_images")
        return load_folder(path)
    raise DataError(f"data: unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


# --------------------------------------------------------------------------- dequantization
def dequantize(levels: Tensor, n_levels: int, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform dequantization ``x = (k + u) / n_levels``, ``u ~ U[0, 1)``.

    Shapes:
        levels: (N, C, H, W) integers in 0..n_levels-1 -> x: (N, C, H, W) in [0, 1)

    Example:
        >>> x = dequantize(torch.tensor([[[[0, 16]]]]), 17)
        >>> bool(((x >= 0) & (x < 1)).all())
        True
    """
    k = levels.to(dtype)
    u = torch.rand(k.shape, generator=generator, dtype=dtype, device=k.device)
    # k + u can round up to k + 1 in float32 (spacing 2^-19 at 16); keep x inside k's bin so
    # that x < 1 always holds for layers defined on [0, 1) (logit).
    upper = torch.nextafter((k + 1) / n_levels, torch.zeros((), dtype=dtype, device=k.device))
    return torch.minimum((k + u) / n_levels, upper)


def levels_to_unit(levels: Tensor, n_levels: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Bin centres ``(k + 1/2) / n_levels``: a deterministic point of each level's bin."""
    return (levels.to(dtype) + 0.5) / n_levels


def unit_to_levels(x: Tensor, n_levels: int) -> Tensor:
    """Quantize data in ``[0, 1)`` back to integer levels ``floor(x · n_levels)``, clamped."""
    return torch.clamp(torch.floor(x * n_levels), 0, n_levels - 1).to(torch.long)


def bits_per_dim(log_prob: Tensor, num_dims: int, n_levels: int) -> Tensor:
    """Bits per dimension of the discrete data from the density of dequantized data.

    ``bpd = (−log p(x) + D log n_levels) / (D log 2)`` where ``p`` is the density on ``[0, 1)^D``
    (the change of variables from ``[0, n_levels)^D`` to ``[0, 1)^D`` adds ``D log n_levels``).

    Example:
        >>> round(float(bits_per_dim(torch.zeros(1), 64, 17)), 4)   # the uniform density
        4.0875
    """
    return (-log_prob + num_dims * math.log(n_levels)) / (num_dims * math.log(2.0))


# --------------------------------------------------------------------------- batching
class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A reshuffle per epoch that depends only on ``(seed, epoch)``.

    The interface (``set_epoch``) is :class:`torch.utils.data.distributed.DistributedSampler`'s,
    so a distributed run swaps one for the other; because the order is a function of the epoch,
    a resumed run sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def batch_loader(split: ImageSplit, batch_size: int, sampler: Optional[torch.utils.data.Sampler] = None,
                 drop_last: bool = True) -> torch.utils.data.DataLoader:
    """A :class:`~torch.utils.data.DataLoader` that indexes whole batches at once.

    The data live in memory as tensors, so each batch is one fancy-indexing call instead of
    ``batch_size`` item lookups and a collate. ``sampler=None`` iterates in order (evaluation).
    """
    dataset = torch.utils.data.TensorDataset(split.images, split.labels)
    base = sampler if sampler is not None else torch.utils.data.SequentialSampler(dataset)
    batches = torch.utils.data.BatchSampler(base, batch_size, drop_last=drop_last)
    return torch.utils.data.DataLoader(dataset, sampler=batches, batch_size=None)
