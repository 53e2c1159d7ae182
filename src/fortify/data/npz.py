"""User data from a ``.npz`` file: images (NCHW or NHWC) or tabular rows, checked before use.

Keys: ``x`` and ``y`` (required); ``x_test`` and ``y_test`` (optional, else a test split is drawn
from ``x``/``y``); ``bounds`` (two floats, default [0, 1]; rounded outward to float32, the precision
the inputs are kept in); ``num_classes`` (default max label + 1, and then every class 0..max must
occur, and every class of ``y_test`` in ``y``); ``class_names``; ``layout`` ('NCHW' or 'NHWC', for
images whose shape does not tell). Any other key is refused, so a misspelt ``x_tset`` is not
silently ignored. ``y`` must hold at least two classes. The file is read with
``allow_pickle=False``: nothing in it is ever unpickled, and a member whose header declares more
data than the archive holds is refused before any memory is taken.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fortify.data.base import Dataset, Split, carve_validation, split_arrays
from fortify.data.registry import DATASETS, DataOptions
from fortify.errors import DataError
from fortify.threat import check_in_box

REQUIRED_KEYS = ("x", "y")
OPTIONAL_KEYS = ("x_test", "y_test", "bounds", "num_classes", "class_names", "layout")
LAYOUTS = ("NCHW", "NHWC")
# Far above any real label set: a larger label is an id or a typo, and a model that size would not fit.
MAX_CLASSES = 100_000
# What a damaged archive raises while it is read: a bad CRC, bad deflate data, a cut-off stream
_BROKEN = (OSError, EOFError, zipfile.BadZipFile, zlib.error)
# deflate expands its input at most about 1032-fold: a member that claims more is forged
_MAX_DEFLATE_RATIO = 1032
_PICKLE_START, _NPY_START = b"\x80", b"\x93NUMPY"


@DATASETS.register("npz")
def load_npz(options: DataOptions) -> Dataset:
    path = require_file(options.path)
    arrays = read_arrays(path)
    bounds = read_bounds(arrays)
    layout = read_layout(arrays)
    x, y = read_pair(arrays, "x", "y", bounds, layout)
    check_several_classes(y, "y")
    if "x_test" in arrays:
        x_test, y_test = read_pair(arrays, "x_test", "y_test", bounds, layout)
        check_same_features(x, x_test)
        if "num_classes" not in arrays:
            check_test_classes_occur_in_training(y, y_test)
        train, val = carve_validation(Split(x, y), options.val_fraction, options.seed)
        test = Split(x_test, y_test)
    else:
        train, val, test = split_arrays(x, y, options.val_fraction, options.test_fraction,
                                        options.seed)
    num_classes = read_num_classes(arrays, torch.cat([train.y, val.y, test.y]))
    if "num_classes" not in arrays:  # declared classes may lack training examples, as for y_test
        check_split_left_classes_in_training(y, train, {"validation": val, "test": test})
    return Dataset("npz", train, val, test, num_classes=num_classes, bounds=bounds,
                   default_model="small-cnn" if x.dim() == 4 else "mlp",
                   class_names=read_class_names(arrays, num_classes),
                   metadata={"source": str(path), "fixed_test_split": "x_test" in arrays})


def require_file(path: Path | str | None) -> Path:
    if path is None:
        raise DataError("the 'npz' dataset needs a path: set the data path (DataOptions.path) "
                        "to a .npz file holding arrays 'x' and 'y'")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz data file {str(path)!r} does not exist or is not a file")
    return path


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    with open_archive(path) as archive:
        arrays = {key: read_member(path, archive, key) for key in archive.files}
    check_keys(path, arrays)
    return arrays


def open_archive(path: Path) -> np.lib.npyio.NpzFile:
    try:
        loaded = np.load(path, allow_pickle=False)
    except _BROKEN as err:
        raise unreadable(path, err) from None
    except ValueError:  # numpy takes whatever is neither a zip nor a .npy file for a pickle
        with open(path, "rb") as stream:
            start = stream.read(len(_NPY_START))
        if start.startswith((_PICKLE_START, _NPY_START)):  # a pickle, or a lone .npy of objects
            raise needs_unpickling(path) from None
        raise DataError(f"{path} is not a .npz archive: it starts with {start!r}, not a zip file's "
                        "signature; write it with numpy.savez(path, x=..., y=...)") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not a .npz archive; write it with "
                        "numpy.savez(path, x=..., y=...)")
    return loaded


def read_member(path: Path, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    check_declared_size(path, archive, key)
    try:
        value = archive[key]
    except ValueError as err:
        # numpy says "allow_pickle" when it refuses an object array; anything else is a broken member
        if "allow_pickle" in str(err):
            raise needs_unpickling(path, key) from None
        raise unreadable(path, err) from None
    except _BROKEN as err:  # a truncated or corrupted member
        raise unreadable(path, err) from None
    except MemoryError:
        raise DataError(f"{path}: member {key!r} is too large to read into memory") from None
    # NpzFile hands back the raw bytes of a non-.npy member: harmless unless it holds a key we read
    if not isinstance(value, np.ndarray) and key in REQUIRED_KEYS + OPTIONAL_KEYS:
        raise DataError(f"{path}: member {key!r} is not a numpy array; write the file with "
                        "numpy.savez(path, x=..., y=...)")
    return value


def check_declared_size(path: Path, archive: np.lib.npyio.NpzFile, key: str) -> None:
    """Refuse a member whose .npy header declares more bytes than the member can hold: numpy would
    allocate the declared size first (a 1 kB file can declare terabytes). The zip directory's own
    size of the member is no proof, since it can be forged too: what the member can hold is
    bounded by its compressed size, and that by the file's."""
    member = f"{key}.npy"
    if member not in archive.zip.namelist():
        return  # not an .npy member: read_member says what it is
    try:
        with archive.zip.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(stream) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(stream))
            header = stream.tell()
    except (*_BROKEN, ValueError) as err:
        raise unreadable(path, err) from None
    declared = math.prod(shape) * dtype.itemsize
    held = _plausible_size(path, archive.zip.getinfo(member)) - header
    if dtype.hasobject or declared <= held:
        return  # object arrays are refused by read_member, without unpickling
    raise DataError(f"{path}: member {key!r} declares shape {shape} of {dtype} ({declared:,} bytes) but "
                    f"holds {held:,} bytes; the file is damaged or forged")


def _plausible_size(path: Path, info: zipfile.ZipInfo) -> int:
    """The most bytes a member can really unpack to: its stated size, capped by what its stored or
    deflated bytes (themselves no more than the file) can expand to."""
    compressed = min(info.compress_size, path.stat().st_size)
    if info.compress_type == zipfile.ZIP_STORED:
        return min(info.file_size, compressed)
    if info.compress_type == zipfile.ZIP_DEFLATED:  # what numpy.savez_compressed writes
        return min(info.file_size, compressed * _MAX_DEFLATE_RATIO)
    return info.file_size  # bzip2 and LZMA have no such bound: a forgery there meets MemoryError


def unreadable(path: Path, err: Exception) -> DataError:
    return DataError(f"{path} is not a readable .npz archive ({err}); write it with "
                     "numpy.savez(path, x=..., y=...)")


def needs_unpickling(path: Path, key: str | None = None) -> DataError:
    what = (f"{path}: array {key!r} is an object array and" if key else
            f"{path} is a pickle or an object array, not a .npz archive, and it")
    return DataError(f"{what} cannot be read without unpickling. fortify never unpickles data; store "
                     "numbers as numeric arrays and names as np.array(names, dtype=str)")


def check_keys(path: Path, arrays: dict[str, np.ndarray]) -> None:
    needed = set(REQUIRED_KEYS)
    if "x_test" in arrays or "y_test" in arrays:
        needed |= {"x_test", "y_test"}
    missing = sorted(needed - arrays.keys())
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; found keys {sorted(arrays)}; needed: "
                        f"{sorted(needed)} (optional: {', '.join(OPTIONAL_KEYS)})")
    # arrays only: a note or a licence stored beside them is the file's business
    unknown = sorted(key for key, value in arrays.items() if isinstance(value, np.ndarray)
                     and key not in REQUIRED_KEYS + OPTIONAL_KEYS)
    if unknown:  # a misspelt 'x_tset' would otherwise be dropped, and a test split drawn from 'x'
        raise DataError(f"{path}: unknown key(s) {unknown}; valid keys: "
                        f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}")


def read_pair(arrays: dict[str, np.ndarray], x_key: str, y_key: str, bounds: tuple[float, float],
              layout: str | None = None) -> tuple[Tensor, Tensor]:
    x, y = read_inputs(arrays[x_key], x_key, bounds, layout), read_labels(arrays[y_key], y_key)
    if len(x) != len(y):
        raise DataError(f"{x_key!r} has {len(x)} rows but {y_key!r} has {len(y)} labels; "
                        "they must match one to one")
    return x, y


def read_inputs(values: np.ndarray, key: str, bounds: tuple[float, float], layout: str | None = None
                ) -> Tensor:
    if values.dtype.kind not in "biuf":
        raise DataError(f"{key!r} must be numeric, got dtype {values.dtype}")
    if values.ndim >= 2 and math.prod(values.shape[1:]) == 0:
        raise DataError(f"{key!r} has shape {values.shape}: its rows hold no features")
    check_values_fit(values, key, bounds)
    # float32 rounding keeps every value inside the box: its sides are float32 numbers (read_bounds)
    x = torch.from_numpy(np.ascontiguousarray(to_channels_first(values, key, layout), dtype=np.float32))
    check_in_box(x, bounds)
    return x


def check_values_fit(values: np.ndarray, key: str, bounds: tuple[float, float]) -> None:
    """Finite and inside the box, judged on the values as stored (before the float32 cast, which
    would turn 1e39 into inf and call it NaN/Inf)."""
    if values.size and values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(f"{key!r}: inputs contain {int(bad.sum())} NaN/Inf values")
    low, high = (float(values.min()), float(values.max())) if values.size else bounds
    if low < bounds[0] or high > bounds[1]:
        # every digit where the short form of a side that lies outside reads the same as the box's
        hidden = (low < bounds[0] and f"{low:g}" == f"{bounds[0]:g}") or \
            (high > bounds[1] and f"{high:g}" == f"{bounds[1]:g}")
        shown = (f"[{low!r}, {high!r}]", f"[{bounds[0]!r}, {bounds[1]!r}]") if hidden else \
            (f"[{low:g}, {high:g}]", f"[{bounds[0]:g}, {bounds[1]:g}]")
        raise DataError(f"{key!r}: inputs range over {shown[0]}, outside the declared box {shown[1]}; scale "
                        "the data into the box or store a 'bounds' array of two floats in the file to "
                        "declare another box")


def to_channels_first(values: np.ndarray, key: str, layout: str | None = None) -> np.ndarray:
    if values.ndim == 2:
        return values
    if values.ndim != 4:
        raise DataError(f"{key!r} has shape {values.shape}; expected tabular (N, features) or "
                        "images (N, C, H, W) / (N, H, W, C). For grey images of shape (N, H, W) "
                        "add a channel axis: x[:, None]")
    last = (layout == "NHWC") if layout is not None else channels_last(values.shape, key)
    return values.transpose(0, 3, 1, 2) if last else values


def channels_last(shape: tuple[int, ...], key: str) -> bool:
    """Whether images of ``shape`` are (N, H, W, C), when the shape tells: only one end holds a usual
    channel count (1, 3, 4), else only one reading gives a square image ((N, 8, 16, 16) is 8 bands of
    16x16; (N, 16, 16, 8) the same, channels last). Anything else is refused: a guess would train on
    scrambled images."""
    channels = (1, 3, 4)  # grey, RGB, RGBA
    _, c1, c2, c3 = shape
    first, last = c1 in channels, c3 in channels
    if first == last or (first and last and c1 != c3):
        first, last = c2 == c3, c1 == c2
    if first == last:
        raise DataError(f"{key!r} has shape {shape}: cannot tell channels first from channels last; store "
                        "a 'layout' key in the file, np.array('NCHW') or np.array('NHWC')")
    return last


def read_layout(arrays: dict[str, np.ndarray]) -> str | None:
    if "layout" not in arrays:
        return None
    value = arrays["layout"]
    layout = str(value.item()) if value.shape == () and value.dtype.kind == "U" else None
    if layout not in LAYOUTS:
        raise DataError(f"'layout' must be one of {', '.join(LAYOUTS)} (np.array('NCHW')), got "
                        f"{value.dtype} array of shape {value.shape}")
    return layout


def read_labels(values: np.ndarray, key: str) -> Tensor:
    labels = values.reshape(-1) if values.ndim == 2 and values.shape[1] == 1 else values
    if labels.ndim != 1:
        raise DataError(f"{key!r} must be a 1-D array of class indices, got shape {values.shape}")
    if labels.dtype.kind not in "iuf":
        raise DataError(f"{key!r} must hold integer class indices, got dtype {labels.dtype}")
    if labels.dtype.kind == "f":
        check_whole_numbers(labels, key)
    check_label_bounds(labels, key)  # before the cast: uint64 would wrap, huge floats overflow
    return torch.from_numpy(labels.astype(np.int64))


def check_whole_numbers(labels: np.ndarray, key: str) -> None:
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
    if bad.any():
        raise DataError(f"{key!r} must hold integer class indices; found {int(bad.sum())} "
                        f"non-integer values, e.g. {labels[bad][:5].tolist()}")


def check_label_bounds(labels: np.ndarray, key: str) -> None:
    if not labels.size:
        return
    if labels.min() < 0:
        raise DataError(f"{key!r} holds a negative label ({labels.min():g}); labels must be "
                        "class indices 0..num_classes-1")
    if float(labels.max()) >= MAX_CLASSES:  # as a Python float: MAX_CLASSES overflows float16
        raise DataError(f"{key!r} holds the label {labels.max().item()}; labels must be class indices "
                        f"0..num_classes-1 below {MAX_CLASSES}: map ids to 0..K-1 first")


def check_several_classes(labels: Tensor, key: str) -> None:
    classes = torch.unique(labels).tolist()
    if len(classes) < 2:
        raise DataError(f"{key!r} holds a single class {classes}; need at least two")


def check_same_features(x: Tensor, x_test: Tensor) -> None:
    if x.shape[1:] != x_test.shape[1:]:
        raise DataError(f"'x_test' rows have shape {tuple(x_test.shape[1:])} but 'x' rows have "
                        f"{tuple(x.shape[1:])}")


def read_bounds(arrays: dict[str, np.ndarray]) -> tuple[float, float]:
    if "bounds" not in arrays:
        return (0.0, 1.0)
    values = arrays["bounds"]
    if values.shape != (2,) or values.dtype.kind not in "iuf":
        raise DataError(f"'bounds' must be two numbers [low, high], got a {values.dtype} array of shape "
                        f"{values.shape}")
    low, high = float(values[0]), float(values[1])
    limit = float(np.finfo(np.float32).max)
    if not (np.isfinite([low, high]).all() and low < high and -limit <= low and high <= limit):
        raise DataError(f"'bounds' must be finite float32 numbers with low < high, got [{low!r}, {high!r}]")
    return float32_outward(low, -math.inf), float32_outward(high, math.inf)


def float32_outward(value: float, direction: float) -> float:
    """The float32 number nearest ``value`` on the side of ``direction`` (or ``value`` itself): a value
    inside a box stays inside once cast to float32, the precision the inputs are kept in."""
    rounded = np.float32(value)
    if (float(rounded) - value) * direction < 0:
        rounded = np.nextafter(rounded, np.float32(direction))
    return float(rounded)


def read_num_classes(arrays: dict[str, np.ndarray], labels: Tensor) -> int:
    needed = int(labels.max()) + 1
    if "num_classes" not in arrays:
        check_every_class_occurs(labels)
        return needed
    value = arrays["num_classes"]
    if value.size != 1 or value.dtype.kind not in "iu":
        raise DataError(f"'num_classes' must be one integer, got {value.tolist()!r}")
    declared = int(value.reshape(()))
    if declared < needed:
        raise DataError(f"'num_classes' is {declared} but the labels go up to {needed - 1}; "
                        f"num_classes must be at least {needed}")
    if declared > MAX_CLASSES:
        raise DataError(f"'num_classes' is {declared}; at most {MAX_CLASSES} classes are allowed")
    return declared


def check_test_classes_occur_in_training(y: Tensor, y_test: Tensor) -> None:
    """Without 'num_classes', a class of y_test that y never holds would be one the model is scored on
    but cannot learn: most likely ids of another labelling."""
    unseen = sorted(set(torch.unique(y_test).tolist()) - set(torch.unique(y).tolist()))
    if unseen:
        shown = ", ".join(str(c) for c in unseen[:5]) + (", ..." if len(unseen) > 5 else "")
        raise DataError(f"y_test holds {len(unseen)} class(es) that y never does ({shown}): the model could "
                        "not learn them; give them training examples, or store 'num_classes' to declare "
                        "classes without examples")


def check_split_left_classes_in_training(y: Tensor, train: Split, held_out: dict[str, Split]) -> None:
    """A class of ``y`` whose every example the random split put in validation or test would be
    scored but never learnt; the CSV loader refuses the same."""
    learnt = set(torch.unique(train.y).tolist())
    for name, split in held_out.items():
        lost = sorted(set(torch.unique(split.y).tolist()) & set(torch.unique(y).tolist()) - learnt)
        if lost:
            shown = ", ".join(str(c) for c in lost[:5]) + (", ..." if len(lost) > 5 else "")
            raise DataError(f"class(es) {shown} of y fell entirely into the {name} split: the model would "
                            "be scored on them without a training example; give them more examples, or "
                            "choose another seed or a smaller val/test fraction")


def check_every_class_occurs(labels: Tensor) -> None:
    """Without 'num_classes' the classes are 0..max label, so a gap means ids rather than indices."""
    top = int(labels.max())
    present = set(torch.unique(labels).tolist())
    missing = [c for c in range(top + 1) if c not in present]
    if missing:
        shown = ", ".join(str(c) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"the labels go up to {top} but {len(missing)} of the classes 0..{top} never "
                        f"occur ({shown}); labels must be class indices 0..K-1, or the file must "
                        "store 'num_classes' to declare classes without examples")


def read_class_names(arrays: dict[str, np.ndarray], num_classes: int) -> list[str] | None:
    if "class_names" not in arrays:
        return None
    names = arrays["class_names"]
    if names.dtype.kind not in "US" or names.ndim != 1:
        raise DataError(f"'class_names' must be a 1-D string array, got dtype {names.dtype} "
                        f"and shape {names.shape}")
    if len(names) != num_classes:
        raise DataError(f"'class_names' has {len(names)} names but there are {num_classes} "
                        "classes")
    try:
        decoded = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    except UnicodeDecodeError:
        raise DataError("'class_names' holds bytes that are not UTF-8 text; store the names as "
                        "np.array(names, dtype=str)") from None
    repeated = sorted({name for name in decoded if decoded.count(name) > 1})
    if repeated:  # two classes of one name could not be told apart in the report
        raise DataError(f"'class_names' names more than one class {', '.join(map(repr, repeated))}; "
                        "give each class its own name")
    return decoded
