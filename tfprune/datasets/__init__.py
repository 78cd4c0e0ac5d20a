"""Data sets for examples, tests and benchmarks.

`load_mnist` reads the real MNIST sample bundled with the package; the larger
data sets are read from the folder named by ``TFPRUNE_DATA_DIR``.
"""

from tfprune.datasets.mnist import (
    DATA_DIR_ENV,
    data_dir,
    load_cifar10,
    load_fashion_mnist,
    load_mnist,
    read_idx,
    read_mnist_csv,
)

__all__ = [
    "DATA_DIR_ENV",
    "data_dir",
    "load_cifar10",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
    "read_mnist_csv",
]
