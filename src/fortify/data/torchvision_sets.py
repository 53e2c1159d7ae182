"""The standard image datasets, read by torchvision's own loaders into in-memory tensors.

Each dataset lives under ``options.cache_dir / <name>`` in the layout torchvision expects. The
official training set is split into train and validation; the official test set is the test split.
Pixels are converted from the loader's raw uint8 arrays in one tensor operation, not image by
image; files that hold pixels of another type, or labels that are not integers, are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fortify.data.base import Dataset, Split, carve_validation
from fortify.data.registry import DATASETS, DataOptions
from fortify.errors import DataError


@dataclass(frozen=True)
class TorchvisionSpec:
    """How to read one torchvision dataset and what fortify declares about it."""

    name: str
    class_name: str  # attribute of torchvision.datasets
    pixel_layout: str  # layout of the loader's ``.data``: "NHW", "NHWC" or "NCHW"
    labels_attr: str
    num_classes: int
    default_model: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files_hint: str  # where the files go under the root, for error messages
    train_kwargs: dict[str, Any] = field(default_factory=lambda: {"train": True})
    test_kwargs: dict[str, Any] = field(default_factory=lambda: {"train": False})


SPECS = (
    TorchvisionSpec("mnist", "MNIST", "NHW", "targets", 10, "small-cnn",
                    (0.1307,), (0.3081,), "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"),
    TorchvisionSpec("fashion-mnist", "FashionMNIST", "NHW", "targets", 10, "small-cnn",
                    (0.2860,), (0.3530,),
                    "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"),
    TorchvisionSpec("cifar10", "CIFAR10", "NHWC", "targets", 10, "preact-resnet18",
                    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    "cifar-10-batches-py/ (extracted from cifar-10-python.tar.gz)"),
    TorchvisionSpec("cifar100", "CIFAR100", "NHWC", "targets", 100, "preact-resnet18",
                    (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                    "cifar-100-python/ (extracted from cifar-100-python.tar.gz)"),
    TorchvisionSpec("svhn", "SVHN", "NCHW", "labels", 10, "preact-resnet18",
                    (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                    "train_32x32.mat and test_32x32.mat",
                    train_kwargs={"split": "train"}, test_kwargs={"split": "test"}),
)


def pixels_to_unit_nchw(pixels: Any, layout: str) -> Tensor:
    """uint8 pixels in ``layout`` -> float32 (N, C, H, W) in [0, 1]."""
    images = torch.as_tensor(np.asarray(pixels))
    if layout == "NHW":
        images = images.unsqueeze(1)
    elif layout == "NHWC":
        images = images.permute(0, 3, 1, 2)
    return images.contiguous().to(torch.float32).div_(255.0)


def split_from(loaded: Any, spec: TorchvisionSpec, root: Path) -> Split:
    pixels, labels = np.asarray(loaded.data), np.asarray(getattr(loaded, spec.labels_attr))
    # the official files hold uint8 pixels and integer labels: other pixels divided by 255 (floats
    # already in [0, 1]) would stay in the box as other images, and a cast would truncate labels
    if pixels.dtype != np.uint8 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"dataset {spec.name!r}: the files at {root}/{spec.files_hint} hold {pixels.dtype} "
                        f"pixels and {labels.dtype} labels, not uint8 pixels and integer labels; replace "
                        "them with the official files")
    try:
        return Split(pixels_to_unit_nchw(pixels, spec.pixel_layout),
                     torch.from_numpy(labels.astype(np.int64)))
    except DataError as err:  # e.g. an images file and a labels file of different lengths
        raise DataError(f"dataset {spec.name!r}: the files at {root}/{spec.files_hint} do not fit together "
                        f"({err}); replace them with the official files") from None


def open_official_split(spec: TorchvisionSpec, root: Path, download: bool,
                        split_kwargs: dict[str, Any]) -> Any:
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, spec.class_name)
    try:
        return dataset_class(root=root, download=download, **split_kwargs)
    # torchvision's readers check a damaged file with assert (MNIST's idx magic) or fail on its
    # contents with KeyError, ValueError, TypeError (an idx file of another element type) or
    # IndexError and EOFError (a cut-off file): each means files not found or corrupted
    except (RuntimeError, OSError, AssertionError, KeyError, ValueError, TypeError, IndexError,
            EOFError) as err:
        raise DataError(unavailable_message(spec, root, download, err)) from err


def unavailable_message(spec: TorchvisionSpec, root: Path, download: bool,
                        err: Exception) -> str:
    expected = f"{root}/{spec.files_hint}"
    if download:
        return (f"dataset {spec.name!r}: could not download it into {root} ({err}). Check the "
                f"network connection, or fetch the official files by hand and place them at "
                f"{expected}")
    detail = str(err) or type(err).__name__  # torchvision's asserts carry no message
    return (f"dataset {spec.name!r}: files not found or corrupted in {root} ({detail}) and downloading "
            f"is off. Allow the download (DataOptions(download=True)) on a machine with network "
            f"access, or place the official files at {expected}")


def load_torchvision(spec: TorchvisionSpec, options: DataOptions) -> Dataset:
    root = Path(options.cache_dir) / spec.name
    official_train = open_official_split(spec, root, options.download, spec.train_kwargs)
    official_test = open_official_split(spec, root, options.download, spec.test_kwargs)
    train, val = carve_validation(split_from(official_train, spec, root), options.val_fraction,
                                  options.seed)
    digits = [str(i) for i in range(spec.num_classes)]  # SVHN has no ``classes``
    class_names = getattr(official_train, "classes", None) or digits
    return Dataset(spec.name, train, val, split_from(official_test, spec, root),
                   num_classes=spec.num_classes, default_model=spec.default_model,
                   mean=spec.mean, std=spec.std, class_names=list(class_names),
                   metadata={"source": f"torchvision.datasets.{spec.class_name}", "fixed_test_split": True})


def factory_for(spec: TorchvisionSpec) -> Callable[[DataOptions], Dataset]:
    def factory(options: DataOptions) -> Dataset:
        return load_torchvision(spec, options)

    factory.__name__ = f"load_{spec.name.replace('-', '_')}"
    factory.__doc__ = f"torchvision's {spec.class_name}, pixels scaled into [0, 1]."
    return factory


for _spec in SPECS:
    DATASETS.add(_spec.name, factory_for(_spec))
