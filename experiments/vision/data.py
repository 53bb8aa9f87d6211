"""Image classification data: scikit-learn's digits set or Fashion-MNIST's idx files.

Digits: scikit-learn's ``digits.csv.gz`` (what ``sklearn.datasets.load_digits()`` reads), a fixed 80/20
split. The file comes from an installed scikit-learn (located, not imported), else from the Debian
package ``python3-sklearn`` unpacked once into the cache; its CSV is hash-checked, so both sources
give the same arrays. Fashion-MNIST: its own 60k/10k
split from the idx files of the Debian package ``dataset-fashion-mnist``, which `fetch_fashion`
unpacks once into the cache (``$SSTE_CACHE`` or ``~/.cache/sste_jax``) with ``apt-get download`` +
``dpkg-deb -x`` (no root), unless a data folder is given. A Debian package's files are recorded
(``SHA256SUMS``) when unpacked and verified on every load; a damaged one is unpacked again, with a
warning naming the file (`experiments.common.cache.fetch_debian`). A ``--data-dir`` of your own is read
as it is. Images are standardised by the training split's mean and standard deviation.

>>> x_train, y_train, x_test, y_test = load_data("digits")
>>> x_train.shape, x_test.shape
((1438, 8, 8), (359, 8, 8))
"""

import gzip
import hashlib
import io
import pathlib

import numpy as np

from experiments.common.cache import cache_dir_default, fetch_debian, installed_file

DATASETS = {"digits": (8, 2), "fashion": (28, 4)}  # image size, patch size

DIGITS_PACKAGE = "python3-sklearn"  # Debian; scikit-learn's digits.csv.gz is in its sklearn/datasets/data
# the SHA-256 of the decompressed digits.csv.gz, the same in scikit-learn's wheels and Debian's package
DIGITS_CSV_SHA256 = "6ebb3d2fee246a4e99363262ddf8a00a3c41bee6014c373ed9d9216ba7f651b8"
FASHION_PACKAGE = "dataset-fashion-mnist"  # Debian; its idx files are in usr/share/datasets/fashion-mnist
FASHION_FILES = tuple(
    f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")
)


def digits_file(cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """scikit-learn's ``digits.csv.gz``: an installed scikit-learn's, else Debian ``python3-sklearn``'s."""
    installed = installed_file("sklearn", "datasets/data/digits.csv.gz")
    if installed is not None:
        return installed
    target = pathlib.Path(cache_dir or cache_dir_default()) / DIGITS_PACKAGE
    folder = fetch_debian(DIGITS_PACKAGE, target, "usr/lib/python3/dist-packages/sklearn/datasets/data",
                          "the digits set", "pip install scikit-learn, or use --set dataset=fashion")
    return folder / "digits.csv.gz"


def load_digits_split(seed: int = 0, cache_dir: str | pathlib.Path | None = None):
    """``(x_train, y_train, x_test, y_test)``: images ``(N, 8, 8)`` standardised by train statistics."""
    path = digits_file(cache_dir)
    csv = gzip.decompress(path.read_bytes())
    digest = hashlib.sha256(csv).hexdigest()
    if digest != DIGITS_CSV_SHA256:
        raise ValueError(f"{path}: its CSV has SHA-256 {digest}, not {DIGITS_CSV_SHA256} (scikit-learn's digits set)")
    table = np.loadtxt(io.BytesIO(csv), delimiter=",")
    x_Nx8x8 = table[:, :-1].reshape(-1, 8, 8).astype(np.float32)
    y_N = table[:, -1].astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y_N))
    n_test = len(y_N) // 5
    test, train = order[:n_test], order[n_test:]
    mean, std = x_Nx8x8[train].mean(), x_Nx8x8[train].std()
    x_Nx8x8 = (x_Nx8x8 - mean) / std
    return x_Nx8x8[train], y_N[train], x_Nx8x8[test], y_N[test]


def _idx(path: pathlib.Path) -> np.ndarray:
    """An idx file (gzip): a big-endian header of dimension sizes, then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if raw[2] != 8 or data.size != np.prod(shape):
        raise ValueError(f"{path}: not a uint8 idx file of shape {shape} (type byte {raw[2]}, {data.size} values)")
    return data.reshape(shape)


def load_fashion_split(data_dir: str | pathlib.Path):
    """Fashion-MNIST's train/test split: images ``(N, 28, 28)`` standardised by train statistics."""
    d = pathlib.Path(data_dir)
    missing = [f for f in FASHION_FILES if not (d / f).exists()]
    if missing:
        raise FileNotFoundError(f"{d} lacks {missing}: see `python -m experiments.vision.train --help` for the data")
    x_train, x_test = (_idx(d / f"{s}-images-idx3-ubyte.gz").astype(np.float32) for s in ("train", "t10k"))
    y_train, y_test = (_idx(d / f"{s}-labels-idx1-ubyte.gz").astype(np.int32) for s in ("train", "t10k"))
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def fetch_fashion(cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Fashion-MNIST's idx folder, from the Debian package unpacked once into ``<cache>/dataset-fashion-mnist``."""
    target = pathlib.Path(cache_dir or cache_dir_default()) / FASHION_PACKAGE
    return fetch_debian(FASHION_PACKAGE, target, "usr/share/datasets/fashion-mnist", "Fashion-MNIST",
                        "pass --data-dir with the idx files, or use --set dataset=digits")


def load_data(dataset: str, data_dir: str | pathlib.Path | None = None, cache_dir: str | pathlib.Path | None = None):
    """``(x_train, y_train, x_test, y_test)`` of ``"digits"`` or ``"fashion"`` (from ``data_dir``, else fetched)."""
    if dataset == "digits":
        return load_digits_split(cache_dir=cache_dir)
    if dataset == "fashion":
        return load_fashion_split(data_dir or fetch_fashion(cache_dir))
    raise ValueError(f"unknown dataset {dataset!r}: use one of {sorted(DATASETS)}")
