"""Data loaders (digits, MNIST idx files, CIFAR-10 pickles, image folders), splits, dequantization."""

from __future__ import annotations

import gzip
import math
import pickle
import struct

import numpy as np
import pytest
import torch

from flowplugins.data import (
    DataError,
    DataNotFoundError,
    EpochShuffleSampler,
    batch_loader,
    bits_per_dim,
    dequantize,
    levels_to_unit,
    load_cifar10,
    load_data,
    load_digits,
    load_folder,
    load_mnist,
    read_idx,
    split_indices,
    unit_to_levels,
)


# ------------------------------------------------------------------------------ writers
def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_mnist(root, n_train=30, n_test=10, seed=0):
    rng = np.random.RandomState(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.randint(0, 10, (n_train,)),
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.randint(0, 10, (n_test,)),
    }
    for i, (name, arr) in enumerate(data.items()):
        write_idx(raw / name, arr, compress=(i == 0))  # one .gz file, as the mirrors ship them
    return data


def write_cifar(root, per_batch=6, n_test=5, seed=0):
    rng = np.random.RandomState(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
                 b"labels": rng.randint(0, 10, n).tolist()}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
        batches[name] = batch
    return batches


def write_folder(root, classes=("cat", "dog"), per_class=6, size=(6, 4), mode="L"):
    from PIL import Image

    rng = np.random.RandomState(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(rng.randint(0, 256, shape).astype(np.uint8), mode=mode).save(
                root / c / f"{i}.png"
            )


# ------------------------------------------------------------------------------ digits
def test_digits_split_sizes_levels_and_determinism():
    a, b = load_digits(), load_digits()
    assert (len(a.train), len(a.val), len(a.test)) == (1350, 150, 297)
    assert len(a.train) + len(a.val) == 1500
    assert a.n_levels == 17 and a.num_classes == 10 and a.event_shape == (1, 8, 8)
    assert a.train.images.dtype == torch.uint8 and int(a.train.images.max()) == 16
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.val.labels, b.val.labels)
    assert math.isclose(math.log2(a.n_levels), 4.0875, abs_tol=1e-4)


def test_digits_splits_are_disjoint():
    train_idx, test_idx = split_indices(1797, [1500, 297])
    assert not set(train_idx) & set(test_idx) and len(set(train_idx) | set(test_idx)) == 1797
    assert len(load_digits(val_size=300).val) == 300


def test_split_indices_rejects_sizes_that_do_not_fit():
    with pytest.raises(DataError, match="do not fit"):
        split_indices(10, [8, 5])


def test_val_size_out_of_range_is_an_error():
    with pytest.raises(DataError, match="val_size"):
        load_digits(val_size=1500)


# ------------------------------------------------------------------------------ MNIST
def test_mnist_reads_idx_files(tmp_path):
    arrays = write_mnist(tmp_path)
    data = load_mnist(tmp_path, val_size=5)
    assert (len(data.train), len(data.val), len(data.test)) == (25, 5, 10)
    assert data.event_shape == (1, 28, 28) and data.n_levels == 256
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.uint8)))
    all_train = torch.cat([data.train.labels, data.val.labels]).sort().values
    expected = torch.from_numpy(np.sort(arrays["train-labels-idx1-ubyte"]))
    assert torch.equal(all_train, expected)


def test_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DataNotFoundError, match="--download") as info:
        load_mnist(tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value) and str(tmp_path) in str(info.value)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"abc")
    with pytest.raises(DataError, match="should hold 5 bytes"):
        read_idx(short)


# ------------------------------------------------------------------------------ CIFAR-10
def test_cifar10_reads_pickle_batches(tmp_path):
    batches = write_cifar(tmp_path)
    data = load_cifar10(tmp_path, val_size=3)
    assert (len(data.train), len(data.val), len(data.test)) == (27, 3, 5)
    assert data.event_shape == (3, 32, 32) and data.n_levels == 256
    first = torch.from_numpy(batches["test_batch"][b"data"][0].reshape(3, 32, 32))
    assert torch.equal(data.test.images[0], first)


def test_cifar10_missing_batches_say_how_to_get_them(tmp_path):
    with pytest.raises(DataNotFoundError, match="--download"):
        load_cifar10(tmp_path)


def test_cifar10_bad_batch_is_a_clear_error(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(tmp_path)


# ------------------------------------------------------------------------------ folders
def test_folder_of_grey_pngs_with_class_subfolders(tmp_path):
    write_folder(tmp_path / "imgs")
    data = load_data(f"folder:{tmp_path / 'imgs'}")
    assert data.event_shape == (1, 4, 6) and data.num_classes == 2 and data.n_levels == 256
    assert len(data.train) + len(data.val) + len(data.test) == 12
    assert set(torch.cat([data.train.labels, data.val.labels, data.test.labels]).tolist()) == {0, 1}


def test_folder_of_rgb_pngs(tmp_path):
    write_folder(tmp_path, classes=("a",), per_class=10, mode="RGB")
    data = load_folder(tmp_path)
    assert data.event_shape == (3, 4, 6) and data.num_classes == 1


def test_folder_errors(tmp_path):
    from PIL import Image

    with pytest.raises(DataNotFoundError, match="not a directory"):
        load_folder(tmp_path / "nope")
    with pytest.raises(DataNotFoundError, match="no image files"):
        load_folder(tmp_path)
    write_folder(tmp_path, classes=("a",), per_class=4)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "a" / "odd.png")
    with pytest.raises(DataError, match="same size"):
        load_folder(tmp_path)
    with pytest.raises(DataError, match="needs a path"):
        load_data("folder:")


def test_unknown_data_name():
    with pytest.raises(DataError, match="unknown data set 'mnits'"):
        load_data("mnits")


# ------------------------------------------------------------------------------ dequantization
def test_dequantize_stays_in_each_levels_bin():
    levels = torch.arange(17).repeat(200).reshape(-1, 1, 1, 17)
    x = dequantize(levels, 17, generator=torch.Generator().manual_seed(0))
    assert bool(((x >= 0) & (x < 1)).all())
    assert torch.equal(unit_to_levels(x, 17), levels.long())
    assert torch.equal(unit_to_levels(levels_to_unit(levels, 17), 17), levels.long())


def test_dequantize_never_reaches_one_in_float32(monkeypatch):
    # With u = 1 - 2^-24, 16 + u rounds to 17 in float32; the clamp keeps x inside the bin.
    def largest_u(shape, generator=None, dtype=None, device=None):
        return torch.full(shape, 1.0 - 2.0**-24, dtype=dtype, device=device)

    monkeypatch.setattr(torch, "rand", largest_u)
    x = dequantize(torch.full((1, 1, 1, 1), 16), 17)
    assert float(x) < 1.0 and int(unit_to_levels(x, 17)) == 16


def test_bits_per_dim_for_n_levels():
    # The uniform density on [0, 1)^D scores log2(n_levels) bits/dim.
    assert math.isclose(float(bits_per_dim(torch.zeros((), dtype=torch.float64), 64, 17)), math.log2(17), rel_tol=1e-12)
    # A density twice as high everywhere saves exactly one bit over D dims.
    assert math.isclose(float(bits_per_dim(torch.tensor(64 * math.log(2.0)), 64, 256)), 7.0)


def test_epoch_shuffle_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(5)
    assert list(a) != list(b)


def test_batch_loader_yields_whole_batches():
    data = load_digits()
    loader = batch_loader(data.val, 64, sampler=EpochShuffleSampler(len(data.val)), drop_last=True)
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (64, 1, 8, 8) and batches[0][1].shape == (64,)
    assert sum(len(b[0]) for b in batch_loader(data.val, 64, drop_last=False)) == 150
