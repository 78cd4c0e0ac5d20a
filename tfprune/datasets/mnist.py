"""Loaders for the bundled MNIST sample and for larger data sets kept outside the package.

The package ships a real, small MNIST sample in ``tfprune/datasets/data/``
(no network needed). Fashion-MNIST and CIFAR-10 are too large to ship; they are
read from a folder laid out like the project's shared data folder::

    $TFPRUNE_DATA_DIR/
        mnist/          t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, mnist_5k.csv.gz
        fashion-mnist/  train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...
        cifar10/        cifar10_train_10k.npz, cifar10_test.npz  (arrays ``x`` and ``y``)
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DATA_DIR_ENV = "TFPRUNE_DATA_DIR"
"""Environment variable: a folder holding ``mnist/``, ``fashion-mnist/``, ``cifar10/``."""

_BUNDLED = Path(__file__).resolve().parent / "data"

# IDX element type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path) -> bytes:
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx(path) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzip-compressed or not.

    The header is two zero bytes, a type code, the number of dimensions, then
    one big-endian uint32 per dimension; the data follow, big-endian.

    Args:
        path: Path to an ``*-idx*-ubyte`` or ``*-idx*-ubyte.gz`` file.

    Returns:
        A numpy array with the file's shape, in native byte order (``uint8``
        for MNIST images and labels).

    Raises:
        ValueError: If the magic number is not a valid IDX header, or the file
            size does not match the dimensions in the header.

    Example:
        >>> labels = read_idx("t10k-labels-idx1-ubyte.gz")  # doctest: +SKIP
        >>> labels.shape
        (10000,)
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        magic = raw[:4].hex() if len(raw) >= 4 else repr(raw)
        raise ValueError(
            f"read_idx: {os.fspath(path)!r} is not an IDX file: bad magic number 0x{magic} "
            f"(expected 0x0000TTNN with type code TT in "
            f"{sorted(f'0x{k:02x}' for k in _IDX_DTYPES)} and NN dimensions)."
        )
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"read_idx: {os.fspath(path)!r} is truncated inside its header.")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"read_idx: {os.fspath(path)!r} holds {len(raw) - header} data bytes, "
            f"but its header announces shape {shape} ({expected} bytes)."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_mnist_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """Reads MNIST samples stored as CSV rows (784 pixel values 0-255, then the label).

    Args:
        path: Path to a ``.csv`` or ``.csv.gz`` file without a header line.

    Returns:
        ``(images, labels)``: ``uint8`` arrays of shape ``(N, 28, 28)`` and ``(N,)``.

    Raises:
        ValueError: If a row does not have 785 values.

    Example:
        >>> x, y = read_mnist_csv("mnist_5k.csv.gz")  # doctest: +SKIP
        >>> x.shape, y.shape
        ((5000, 28, 28), (5000,))
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(
            f"read_mnist_csv: {os.fspath(path)!r} has {table.shape[1]} columns per row, "
            f"expected 785 (784 pixels, then the label)."
        )
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.uint8)
    return images, labels


def _scale(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(255.0)


def data_dir(path=None, subdir: str | None = None) -> Path:
    """Finds a data folder: ``path`` if given, else ``$TFPRUNE_DATA_DIR``.

    Args:
        path: A folder that holds ``subdir`` (the shared data root) or that is
            ``subdir`` itself. None: use the ``TFPRUNE_DATA_DIR`` environment
            variable.
        subdir: The data set's folder name, e.g. ``"cifar10"``.

    Returns:
        The folder holding the data set's files.

    Raises:
        FileNotFoundError: If neither ``path`` nor ``TFPRUNE_DATA_DIR`` is given,
            or the folder does not exist.

    Example:
        >>> os.environ["TFPRUNE_DATA_DIR"] = "../shared/data"  # doctest: +SKIP
        >>> data_dir(subdir="cifar10")  # doctest: +SKIP
        PosixPath('../shared/data/cifar10')
    """
    what = f"the {subdir!r} data" if subdir else "data"
    if path is None:
        env = os.environ.get(DATA_DIR_ENV)
        if not env:
            raise FileNotFoundError(
                f"Cannot find {what}: pass `path=` or set the environment variable "
                f"{DATA_DIR_ENV} to a folder containing mnist/, fashion-mnist/ and cifar10/ "
                f"(e.g. the project's shared data folder)."
            )
        path, source = Path(env), f"{DATA_DIR_ENV}={env!r}"
    else:
        path, source = Path(path), f"path={os.fspath(path)!r}"
    if subdir and (path / subdir).is_dir():
        path = path / subdir
    if not path.is_dir():
        raise FileNotFoundError(
            f"Cannot find {what}: {source} is not a folder (set {DATA_DIR_ENV} or pass `path=` "
            f"to a folder containing {subdir or 'the data set'}/)."
        )
    return path


def _require(folder: Path, name: str) -> Path:
    file = folder / name
    if not file.is_file():
        raise FileNotFoundError(
            f"Missing data file {name!r} in {os.fspath(folder)!r} "
            f"(located through `path=` or {DATA_DIR_ENV})."
        )
    return file


TRAIN_SHUFFLE_SEED = 0
"""Seed of the fixed permutation `load_mnist` applies to the training set."""


def load_mnist() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Loads the bundled real MNIST sample with the project's agreed split (no network).

    Train: the 5,000 bundled MNIST training samples and the first 5,000
    images of the official test set (10,000 in all), shuffled once with a
    fixed seed (the bundled CSV is sorted by label, so any ``x[:n]`` of the
    unshuffled set would hold a few digits only). Test: the last 5,000 images
    of the official test set, in their original order.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images ``float32`` in
        ``[0, 1]`` of shape ``(N, 28, 28)``, labels ``int64`` in ``0..9``;
        ``N`` is 10,000 for train and 5,000 for test.

    Example:
        >>> (x_train, y_train), (x_test, y_test) = load_mnist()
        >>> x_train.shape, x_test.shape
        ((10000, 28, 28), (5000, 28, 28))
    """
    x_csv, y_csv = read_mnist_csv(_BUNDLED / "mnist_5k.csv.gz")
    x_t10k = read_idx(_BUNDLED / "t10k-images-idx3-ubyte.gz")
    y_t10k = read_idx(_BUNDLED / "t10k-labels-idx1-ubyte.gz")
    x_train = np.concatenate([x_csv, x_t10k[:5000]])
    y_train = np.concatenate([y_csv, y_t10k[:5000]])
    order = np.random.default_rng(TRAIN_SHUFFLE_SEED).permutation(len(x_train))
    x_train, y_train = x_train[order], y_train[order]
    return (
        (_scale(x_train), y_train.astype(np.int64)),
        (_scale(x_t10k[5000:]), y_t10k[5000:].astype(np.int64)),
    )


def load_fashion_mnist(
    path=None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Loads the full Fashion-MNIST (60,000 train, 10,000 test) from a data folder.

    Args:
        path: The shared data root (holding ``fashion-mnist/``) or the
            ``fashion-mnist`` folder itself. None: ``$TFPRUNE_DATA_DIR``.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images ``float32`` in
        ``[0, 1]`` of shape ``(N, 28, 28)``, labels ``int64`` in ``0..9``.

    Raises:
        FileNotFoundError: If no folder is given and ``TFPRUNE_DATA_DIR`` is
            not set, or a file is missing.

    Example:
        >>> (x_train, y_train), _ = load_fashion_mnist("../shared/data")  # doctest: +SKIP
        >>> x_train.shape
        (60000, 28, 28)
    """
    folder = data_dir(path, "fashion-mnist")

    def split(prefix):
        x = read_idx(_require(folder, f"{prefix}-images-idx3-ubyte.gz"))
        y = read_idx(_require(folder, f"{prefix}-labels-idx1-ubyte.gz"))
        return _scale(x), y.astype(np.int64)

    return split("train"), split("t10k")


def load_cifar10(
    path=None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Loads the CIFAR-10 sample (10,000 train, 10,000 test) from a data folder.

    The train split is the first 1,000 training images of each class; the test
    split is the full official test set (decoded from a JPEG copy, see the data
    README).

    Args:
        path: The shared data root (holding ``cifar10/``) or the ``cifar10``
            folder itself. None: ``$TFPRUNE_DATA_DIR``.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images ``float32`` in
        ``[0, 1]`` of shape ``(N, 32, 32, 3)``, labels ``int64`` in ``0..9``.

    Raises:
        FileNotFoundError: If no folder is given and ``TFPRUNE_DATA_DIR`` is
            not set, or a file is missing.

    Example:
        >>> (x_train, y_train), (x_test, y_test) = load_cifar10()  # doctest: +SKIP
        >>> x_train.shape
        (10000, 32, 32, 3)
    """
    folder = data_dir(path, "cifar10")

    def split(name):
        with np.load(_require(folder, name)) as data:
            return _scale(data["x"]), data["y"].astype(np.int64).reshape(-1)

    return split("cifar10_train_10k.npz"), split("cifar10_test.npz")
