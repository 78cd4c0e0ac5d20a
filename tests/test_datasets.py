import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from tfprune import datasets
from tfprune.datasets import mnist as mnist_module

BUNDLED = Path(mnist_module.__file__).resolve().parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# md5 of the IDX files from the data README; the CSV sample's md5 is pinned at bundling time.
MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "mnist_5k.csv.gz": "1edea4bd327f562974bd5a5321bbb524",
}


@pytest.fixture(scope="module")
def mnist():
    return datasets.load_mnist()


def _write_idx(path, array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(">u1").tobytes())


@pytest.mark.parametrize("name", sorted(MD5))
def test_bundled_file_matches_md5(name):
    assert hashlib.md5((BUNDLED / name).read_bytes()).hexdigest() == MD5[name]


def test_load_mnist_shapes_and_dtypes_follow_agreed_split(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    assert x_train.shape == (10000, 28, 28) and y_train.shape == (10000,)
    assert x_test.shape == (5000, 28, 28) and y_test.shape == (5000,)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64


def test_load_mnist_values_in_unit_range_and_labels_are_digits(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
        assert 0.05 < x.mean() < 0.25  # mostly black background, some white strokes
    for y in (y_train, y_test):
        assert set(np.unique(y)) == set(range(10))


def test_load_mnist_classes_roughly_balanced(mnist):
    (_, y_train), (_, y_test) = mnist
    for y in (y_train, y_test):
        share = np.bincount(y, minlength=10) / len(y)
        assert share.min() > 0.07 and share.max() < 0.13


def test_load_mnist_test_split_is_last_half_of_official_test_set(mnist):
    (x_train, _), (x_test, y_test) = mnist
    images = datasets.read_idx(BUNDLED / "t10k-images-idx3-ubyte.gz")
    labels = datasets.read_idx(BUNDLED / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(x_test, images[5000:] / np.float32(255))
    np.testing.assert_array_equal(y_test, labels[5000:])
    order = np.random.default_rng(datasets.mnist.TRAIN_SHUFFLE_SEED).permutation(10000)
    from_test = order >= 5000  # positions holding the first half of the official test set
    expected = images[order[from_test] - 5000] / np.float32(255)
    np.testing.assert_array_equal(x_train[from_test], expected)


def test_load_mnist_train_set_is_shuffled_so_prefixes_hold_every_digit(mnist):
    (_, y_train), _ = mnist
    assert len(np.unique(y_train[:256])) == 10
    assert len(np.unique(y_train[:5000])) == 10


def test_read_idx_rejects_bad_magic_number(tmp_path):
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(b"\x08\x03\x00\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad magic number 0x08030001"):
        datasets.read_idx(bad)


def test_read_idx_rejects_size_mismatch(tmp_path):
    path = tmp_path / "short-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + np.asarray([5], ">u4").tobytes() + b"\x01\x02")
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        datasets.read_idx(path)


def test_read_idx_round_trips_big_endian_dims(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a-idx3-ubyte.gz", array)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a-idx3-ubyte.gz"), array)


def test_read_mnist_csv_rejects_wrong_width(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="785"):
        datasets.read_mnist_csv(path)


@pytest.mark.parametrize("loader", [datasets.load_fashion_mnist, datasets.load_cifar10])
def test_loader_without_path_or_env_names_env_var(loader, monkeypatch):
    monkeypatch.delenv("TFPRUNE_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="TFPRUNE_DATA_DIR"):
        loader()


def test_loader_with_missing_folder_names_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("TFPRUNE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="TFPRUNE_DATA_DIR"):
        datasets.load_cifar10()


def test_load_fashion_mnist_reads_folder_from_env(monkeypatch, tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("TFPRUNE_DATA_DIR", str(tmp_path))
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    assert x_train.shape == (6, 28, 28) and x_test.shape == (4, 28, 28)
    assert x_train.dtype == np.float32 and 0 <= x_train.min() and x_train.max() <= 1
    assert y_train.dtype == np.int64 and list(y_test) == [0, 1, 2, 3]


def test_load_cifar10_reads_given_folder(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    for name, n in (("cifar10_train_10k.npz", 5), ("cifar10_test.npz", 3)):
        x = np.full((n, 32, 32, 3), 255, np.uint8)
        np.savez(folder / name, x=x, y=np.arange(n, dtype=np.uint8))
    (x_train, y_train), (x_test, y_test) = datasets.load_cifar10(folder)
    assert x_train.shape == (5, 32, 32, 3) and x_test.shape == (3, 32, 32, 3)
    assert x_train.dtype == np.float32 and x_train.max() == 1.0
    assert y_test.dtype == np.int64 and list(y_test) == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder ../shared/data absent")
def test_real_fashion_mnist_and_cifar10(monkeypatch):
    monkeypatch.setenv("TFPRUNE_DATA_DIR", str(SHARED))
    (x_train, y_train), (x_test, _) = datasets.load_fashion_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert np.all(np.bincount(y_train) == 6000)
    (x_train, y_train), (x_test, _) = datasets.load_cifar10()
    assert x_train.shape == (10000, 32, 32, 3) and x_test.shape == (10000, 32, 32, 3)
    assert np.all(np.bincount(y_train) == 1000)
