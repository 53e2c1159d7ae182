"""The torchvision loaders, run for real on tiny raw files written in each dataset's own format.

Nothing is downloaded: every test builds with ``download=False`` or with the download replaced by
a stub that fails as an offline machine would.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets as tvd

from fortify.data import DATASETS, DataOptions, load_dataset
from fortify.data.base import split_indices
from fortify.errors import DataError

N_TRAIN, N_TEST = 20, 6
KNOWN_PIXEL, KNOWN_VALUE = (0, -1, 3, 5), 200  # test image 0, last channel, row 3, column 5
NAMES = ["mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"]
TORCHVISION_CLASS = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST,
                     "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN}
IMAGE_SHAPE = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32),
               "cifar100": (3, 32, 32), "svhn": (3, 32, 32)}
NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}


@dataclass
class Written:
    """What a test wrote, as the loader should return it: uint8 NCHW pixels and class indices."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def random_images(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    images.reshape(-1)[:2] = (0, 255)  # both ends of the pixel range
    return images


def made_up(name: str) -> Written:
    shape, classes = IMAGE_SHAPE[name], NUM_CLASSES[name]
    written = Written(random_images(shape, N_TRAIN, 1), np.arange(N_TRAIN) % classes,
                      random_images(shape, N_TEST, 2), (np.arange(N_TEST) * 7 + 3) % classes)
    written.test_x[KNOWN_PIXEL] = KNOWN_VALUE
    return written


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx-ubyte format: magic (0, 0, type 0x08 = uint8, ndim), big-endian sizes, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_like(name: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Written:
    written = made_up(name)
    raw = cache_dir / name / TORCHVISION_CLASS[name].__name__ / "raw"
    raw.mkdir(parents=True)
    for prefix, x, y in (("train", written.train_x, written.train_y),
                         ("t10k", written.test_x, written.test_y)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return written


def write_pickle(path: Path, content: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(content, f)  # the CIFAR release is itself a set of pickled dicts


def use_checksums_of_written_files(monkeypatch: pytest.MonkeyPatch, cifar_class: type,
                                   folder: Path) -> None:
    # torchvision checks every CIFAR file against the md5 of the official release. Our files are
    # in the official format but tiny, so this one class's checksum table is pointed at them; the
    # integrity check itself still runs (and would catch a file we forgot or misnamed).
    def table(files: list[list[str]]) -> list[list[str]]:
        return [[file, md5_of(folder / file)] for file, _ in files]

    monkeypatch.setattr(cifar_class, "train_list", table(cifar_class.train_list))
    monkeypatch.setattr(cifar_class, "test_list", table(cifar_class.test_list))
    meta_md5 = md5_of(folder / cifar_class.meta["filename"])
    monkeypatch.setattr(cifar_class, "meta", {**cifar_class.meta, "md5": meta_md5})


def cifar10_names() -> list[str]:
    return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
            "truck"]


def write_cifar10(name: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Written:
    written = made_up(name)
    folder = cache_dir / name / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per_batch = N_TRAIN // 5
    for b in range(5):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        write_pickle(folder / f"data_batch_{b + 1}",
                     {"data": written.train_x[rows].reshape(per_batch, -1),
                      "labels": written.train_y[rows].tolist()})
    write_pickle(folder / "test_batch", {"data": written.test_x.reshape(N_TEST, -1),
                                         "labels": written.test_y.tolist()})
    write_pickle(folder / "batches.meta", {"label_names": cifar10_names()})
    use_checksums_of_written_files(monkeypatch, tvd.CIFAR10, folder)
    return written


def write_cifar100(name: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Written:
    written = made_up(name)
    folder = cache_dir / name / "cifar-100-python"
    folder.mkdir(parents=True)
    for file, x, y in (("train", written.train_x, written.train_y),
                       ("test", written.test_x, written.test_y)):
        write_pickle(folder / file, {"data": x.reshape(len(x), -1), "fine_labels": y.tolist(),
                                     "coarse_labels": (y // 5).tolist()})
    write_pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                   "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    use_checksums_of_written_files(monkeypatch, tvd.CIFAR100, folder)
    return written


def write_svhn(name: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Written:
    written = made_up(name)
    folder = cache_dir / name
    folder.mkdir(parents=True)
    split_list = dict(tvd.SVHN.split_list)
    for split, x, y in (("train", written.train_x, written.train_y),
                        ("test", written.test_x, written.test_y)):
        url, file, _ = split_list[split]
        svhn_labels = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)  # SVHN: 10 is "0"
        scipy.io.savemat(folder / file, {"X": x.transpose(2, 3, 1, 0), "y": svhn_labels})
        split_list[split] = [url, file, md5_of(folder / file)]
    # As for CIFAR: the md5 check runs, against the files written here instead of the release.
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)
    return written


WRITERS = {"mnist": write_mnist_like, "fashion-mnist": write_mnist_like,
           "cifar10": write_cifar10, "cifar100": write_cifar100, "svhn": write_svhn}


def offline_options(cache_dir: Path, seed: int = 0) -> DataOptions:
    return DataOptions(seed=seed, val_fraction=0.25, cache_dir=cache_dir, download=False)


def as_unit(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).to(torch.float32) / 255.0


@pytest.mark.parametrize("name", NAMES)
def test_loader_returns_float_nchw_in_unit_box(name, tmp_path, monkeypatch):
    # Prepare
    WRITERS[name](name, tmp_path, monkeypatch)

    # Execute
    data = load_dataset(name, offline_options(tmp_path))

    # Assert
    assert data.input_shape == IMAGE_SHAPE[name]
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.is_contiguous()
    assert float(data.train.x.min()) == 0.0 and float(data.train.x.max()) == 1.0
    assert data.num_classes == NUM_CLASSES[name]
    assert len(data.mean) == len(data.std) == IMAGE_SHAPE[name][0]
    assert len(data.class_names) == NUM_CLASSES[name]


@pytest.mark.parametrize("name", NAMES)
def test_loader_returns_the_pixels_and_labels_written(name, tmp_path, monkeypatch):
    # Prepare
    written = WRITERS[name](name, tmp_path, monkeypatch)
    train_idx, val_idx, _ = split_indices(N_TRAIN, 0.25, 0.0, seed=0, with_test=False)

    # Execute
    data = load_dataset(name, offline_options(tmp_path))

    # Assert
    torch.testing.assert_close(data.test.x, as_unit(written.test_x), rtol=0, atol=0)
    assert data.test.y.tolist() == written.test_y.tolist()
    torch.testing.assert_close(data.train.x, as_unit(written.train_x)[train_idx], rtol=0, atol=0)
    assert data.train.y.tolist() == written.train_y[train_idx.numpy()].tolist()
    assert data.val.y.tolist() == written.train_y[val_idx.numpy()].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_known_pixel_keeps_its_place_and_comes_out_as_value_over_255(name, tmp_path, monkeypatch):
    # Prepare
    WRITERS[name](name, tmp_path, monkeypatch)

    # Execute
    data = load_dataset(name, offline_options(tmp_path))

    # Assert
    assert data.test.x[KNOWN_PIXEL].item() == pytest.approx(KNOWN_VALUE / 255)


@pytest.mark.parametrize("name", NAMES)
def test_official_train_set_is_split_into_train_and_val(name, tmp_path, monkeypatch):
    # Prepare
    WRITERS[name](name, tmp_path, monkeypatch)

    # Execute
    data = load_dataset(name, offline_options(tmp_path))

    # Assert
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, N_TEST)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "svhn"])
def test_split_is_determined_by_the_seed(name, tmp_path, monkeypatch):
    # Prepare
    WRITERS[name](name, tmp_path, monkeypatch)

    # Execute
    first = load_dataset(name, offline_options(tmp_path, seed=3))
    again = load_dataset(name, offline_options(tmp_path, seed=3))
    other = load_dataset(name, offline_options(tmp_path, seed=4))

    # Assert
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.val.y, again.val.y)
    assert not torch.equal(first.train.x, other.train.x)


def test_svhn_label_10_becomes_digit_0(tmp_path, monkeypatch):
    # Prepare
    written = write_svhn("svhn", tmp_path, monkeypatch)

    # Execute
    data = load_dataset("svhn", offline_options(tmp_path))

    # Assert
    all_labels = torch.cat([data.train.y, data.val.y, data.test.y])
    assert 0 in written.train_y and int(all_labels.min()) == 0 and int(all_labels.max()) == 9
    assert data.class_names == [str(d) for d in range(10)]


@pytest.mark.parametrize(("name", "expected_names"), [
    ("cifar10", cifar10_names()),
    ("mnist", tvd.MNIST.classes),
    ("fashion-mnist", tvd.FashionMNIST.classes),
])
def test_class_names_come_from_the_dataset(name, expected_names, tmp_path, monkeypatch):
    # Prepare
    WRITERS[name](name, tmp_path, monkeypatch)

    # Execute
    data = load_dataset(name, offline_options(tmp_path))

    # Assert
    assert data.class_names == list(expected_names)


@pytest.mark.parametrize(("name", "model"), [
    ("mnist", "small-cnn"), ("fashion-mnist", "small-cnn"), ("cifar10", "preact-resnet18"),
    ("cifar100", "preact-resnet18"), ("svhn", "preact-resnet18"),
])
def test_default_model_suits_the_images(name, model, tmp_path, monkeypatch):
    # Prepare
    WRITERS[name](name, tmp_path, monkeypatch)

    # Execute
    data = DATASETS.get(name)(offline_options(tmp_path))

    # Assert
    assert data.default_model == model


@pytest.mark.parametrize("name", NAMES)
def test_missing_files_without_download_raise_data_error(name, tmp_path):
    # Prepare
    options = offline_options(tmp_path)

    # Execute
    with pytest.raises(DataError) as caught:
        DATASETS.get(name)(options)

    # Assert
    message = str(caught.value)
    assert str(tmp_path / name) in message and "download" in message


@pytest.mark.parametrize("name", NAMES)
def test_failed_download_raises_data_error(name, tmp_path, monkeypatch):
    # Prepare
    def offline_download(self):
        raise URLError("no network")

    monkeypatch.setattr(TORCHVISION_CLASS[name], "download", offline_download)
    options = DataOptions(cache_dir=tmp_path, download=True)

    # Execute
    with pytest.raises(DataError) as caught:
        DATASETS.get(name)(options)

    # Assert
    message = str(caught.value)
    assert "could not download" in message and str(tmp_path / name) in message
    assert "no network" in message


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_a_cached_file_that_is_not_idx_raises_data_error(name, tmp_path, monkeypatch):
    # Prepare: an error page saved in place of the training images (torchvision asserts on it)
    write_mnist_like(name, tmp_path, monkeypatch)
    raw = tmp_path / name / TORCHVISION_CLASS[name].__name__ / "raw"
    (raw / "train-images-idx3-ubyte").write_bytes(b"<html><body>503 Service Unavailable</body></html>")

    # Execute
    with pytest.raises(DataError) as caught:
        DATASETS.get(name)(offline_options(tmp_path))

    # Assert
    assert "files not found or corrupted" in str(caught.value)


def test_image_and_label_files_of_different_lengths_name_the_files(tmp_path, monkeypatch):
    # Prepare: the training labels file of another download, one label short
    written = write_mnist_like("mnist", tmp_path, monkeypatch)
    raw = tmp_path / "mnist" / TORCHVISION_CLASS["mnist"].__name__ / "raw"
    write_idx(raw / "train-labels-idx1-ubyte", written.train_y[:-1])
    # Execute / Assert
    with pytest.raises(DataError, match=re.escape(
            f"dataset 'mnist': the files at {tmp_path / 'mnist'}/MNIST/raw/{{train,t10k}}-{{images-idx3,"
            f"labels-idx1}}-ubyte do not fit together ({N_TRAIN} inputs but {N_TRAIN - 1} labels)")):
        DATASETS.get("mnist")(offline_options(tmp_path))


def test_svhn_pixels_that_are_not_uint8_are_refused_not_divided_by_255(tmp_path, monkeypatch):
    # Prepare: the training file rewritten with pixels already scaled to [0, 1] (float64), which
    # divided by 255 once more would stay in the box as nearly black images
    written = write_svhn("svhn", tmp_path, monkeypatch)
    url, file, _ = tvd.SVHN.split_list["train"]
    labels = np.where(written.train_y == 0, 10, written.train_y).astype(np.uint8).reshape(-1, 1)
    scipy.io.savemat(tmp_path / "svhn" / file, {"X": written.train_x.transpose(2, 3, 1, 0) / 255.0,
                                                 "y": labels})
    monkeypatch.setattr(tvd.SVHN, "split_list",
                        {**tvd.SVHN.split_list, "train": [url, file, md5_of(tmp_path / "svhn" / file)]})

    # Execute / Assert
    with pytest.raises(DataError, match=r"dataset 'svhn': .* float64 pixels and int64 labels, not uint8"):
        load_dataset("svhn", offline_options(tmp_path))


def test_cifar_labels_that_are_not_integers_are_refused_not_truncated(tmp_path, monkeypatch):
    # Prepare: one training batch whose labels are fractional, which a cast to int64 would truncate
    written = write_cifar10("cifar10", tmp_path, monkeypatch)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    rows = N_TRAIN // 5
    write_pickle(folder / "data_batch_1", {"data": written.train_x[:rows].reshape(rows, -1),
                                           "labels": (written.train_y[:rows] + 0.5).tolist()})
    use_checksums_of_written_files(monkeypatch, tvd.CIFAR10, folder)

    # Execute / Assert
    with pytest.raises(DataError, match=r"dataset 'cifar10': .* uint8 pixels and float64 labels, not uint8"):
        load_dataset("cifar10", offline_options(tmp_path))
