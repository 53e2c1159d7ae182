"""User data from .npz files: round trips, and a clear DataError for each kind of bad input."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fortify.data import DATASETS, DataOptions, load_dataset
from fortify.errors import DataError

RNG = np.random.default_rng(0)


def write_npz(tmp_path: Path, **arrays: np.ndarray) -> DataOptions:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return DataOptions(path=path, val_fraction=0.2, test_fraction=0.2, seed=0)


def tabular(n: int = 50, features: int = 4) -> dict[str, np.ndarray]:
    return {"x": RNG.random((n, features)), "y": np.arange(n) % 3}


def load_error(options: DataOptions) -> str:
    with pytest.raises(DataError) as caught:
        DATASETS.get("npz")(options)
    return str(caught.value)


def test_tabular_round_trip(tmp_path):
    # Prepare
    arrays = tabular()
    options = write_npz(tmp_path, **arrays)

    # Execute
    data = load_dataset("npz", options)

    # Assert
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 10)
    assert data.input_shape == (4,) and data.train.x.dtype == torch.float32
    assert data.num_classes == 3 and data.default_model == "mlp" and data.bounds == (0.0, 1.0)
    rows = {tuple(r) for r in np.float32(arrays["x"]).tolist()}
    loaded = torch.cat([data.train.x, data.val.x, data.test.x])
    assert {tuple(r) for r in loaded.tolist()} == rows


def test_nhwc_images_become_nchw(tmp_path):
    # Prepare
    x = RNG.random((12, 8, 8, 3)).astype(np.float32)
    y = np.arange(12) % 2
    x_test = RNG.random((4, 8, 8, 3)).astype(np.float32)
    options = write_npz(tmp_path, x=x, y=y, x_test=x_test, y_test=np.array([0, 1, 1, 0]),
                        class_names=np.array(["cat", "dog"]))

    # Execute
    data = load_dataset("npz", options)

    # Assert
    assert data.input_shape == (3, 8, 8) and data.default_model == "small-cnn"
    assert torch.equal(data.test.x, torch.from_numpy(x_test.transpose(0, 3, 1, 2)))
    assert data.test.y.tolist() == [0, 1, 1, 0] and data.test.y.dtype == torch.int64
    assert len(data.train) + len(data.val) == 12
    assert data.class_names == ["cat", "dog"]


def test_nchw_images_stay_as_they_are(tmp_path):
    # Prepare
    x = RNG.random((10, 1, 6, 6)).astype(np.float32)
    options = write_npz(tmp_path, x=x, y=np.arange(10) % 2)

    # Execute
    data = load_dataset("npz", options)

    # Assert
    assert data.input_shape == (1, 6, 6)


def test_declared_bounds_and_num_classes_are_used(tmp_path):
    # Prepare
    options = write_npz(tmp_path, x=RNG.uniform(-1, 1, (20, 3)), y=np.arange(20) % 2,
                        bounds=np.array([-1.0, 1.0]), num_classes=np.array(5))

    # Execute
    data = load_dataset("npz", options)

    # Assert
    assert data.bounds == (-1.0, 1.0) and data.num_classes == 5


def test_missing_path_is_a_data_error():
    # Prepare
    options = DataOptions(path=None)

    # Execute
    message = load_error(options)

    # Assert
    assert "path" in message and "'x'" in message and "'y'" in message


def test_missing_file_is_a_data_error(tmp_path):
    # Prepare
    options = DataOptions(path=tmp_path / "absent.npz")

    # Execute
    message = load_error(options)

    # Assert
    assert "absent.npz" in message and "does not exist" in message


def test_missing_keys_lists_found_and_needed(tmp_path):
    # Prepare
    options = write_npz(tmp_path, x=RNG.random((10, 2)), labels=np.zeros(10, int))

    # Execute
    message = load_error(options)

    # Assert
    assert "missing key(s) ['y']" in message
    assert "found keys ['labels', 'x']" in message and "needed: ['x', 'y']" in message


def test_test_inputs_without_test_labels_is_a_missing_key(tmp_path):
    # Prepare
    options = write_npz(tmp_path, **tabular(), x_test=RNG.random((5, 4)))

    # Execute
    message = load_error(options)

    # Assert
    assert "missing key(s) ['y_test']" in message


def test_length_mismatch_is_a_data_error(tmp_path):
    # Prepare
    options = write_npz(tmp_path, x=RNG.random((10, 2)), y=np.zeros(9, int))

    # Execute
    message = load_error(options)

    # Assert
    assert "'x' has 10 rows but 'y' has 9 labels" in message


def test_non_integer_labels_are_a_data_error(tmp_path):
    # Prepare
    options = write_npz(tmp_path, x=RNG.random((4, 2)), y=np.array([0.0, 1.0, 0.5, 1.0]))

    # Execute
    message = load_error(options)

    # Assert
    assert "integer class indices" in message and "0.5" in message


def test_string_labels_are_a_data_error(tmp_path):
    # Prepare
    options = write_npz(tmp_path, x=RNG.random((2, 2)), y=np.array(["cat", "dog"]))

    # Execute
    message = load_error(options)

    # Assert
    assert "integer class indices" in message and "<U3" in message


def test_whole_float_labels_are_accepted(tmp_path):
    # Prepare
    options = write_npz(tmp_path, x=RNG.random((20, 2)), y=(np.arange(20) % 2).astype(float))

    # Execute
    data = load_dataset("npz", options)

    # Assert
    assert data.train.y.dtype == torch.int64 and data.num_classes == 2


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_inf_inputs_are_a_data_error(bad_value, tmp_path):
    # Prepare
    x = RNG.random((10, 2))
    x[3, 1] = bad_value
    options = write_npz(tmp_path, x=x, y=np.zeros(10, int))

    # Execute
    message = load_error(options)

    # Assert
    assert "'x'" in message and "NaN/Inf" in message


def test_inputs_outside_the_box_report_range_and_box(tmp_path):
    # Prepare
    x = np.linspace(0, 255, 20).reshape(10, 2)
    options = write_npz(tmp_path, x=x, y=np.zeros(10, int))

    # Execute
    message = load_error(options)

    # Assert
    assert "[0, 255]" in message and "box [0, 1]" in message and "bounds" in message


def test_object_arrays_are_refused_not_unpickled(tmp_path):
    # Prepare
    options = write_npz(tmp_path, x=RNG.random((2, 2)), y=np.array([0, 1]),
                        class_names=np.array(["a", None], dtype=object))

    # Execute
    message = load_error(options)

    # Assert
    assert "array 'class_names' is an object array" in message and "never unpickles" in message


def test_three_dimensional_inputs_are_a_data_error(tmp_path):
    # Prepare
    options = write_npz(tmp_path, x=RNG.random((4, 5, 5)), y=np.zeros(4, int))

    # Execute
    message = load_error(options)

    # Assert
    assert "(4, 5, 5)" in message and "x[:, None]" in message


def test_num_classes_below_the_labels_is_a_data_error(tmp_path):
    # Prepare
    options = write_npz(tmp_path, x=RNG.random((10, 2)), y=np.arange(10) % 4,
                        num_classes=np.array(3))

    # Execute
    message = load_error(options)

    # Assert
    assert "'num_classes' is 3" in message and "up to 3" in message


@pytest.mark.parametrize("bounds", [[1.0, 0.0], [0.0, 1.0, 2.0], [0.0, np.inf]])
def test_bad_bounds_are_a_data_error(bounds, tmp_path):
    # Prepare
    options = write_npz(tmp_path, **tabular(), bounds=np.array(bounds))

    # Execute
    message = load_error(options)

    # Assert
    assert "'bounds'" in message


def test_class_names_must_match_num_classes(tmp_path):
    # Prepare
    options = write_npz(tmp_path, **tabular(), class_names=np.array(["a", "b"]))

    # Execute
    message = load_error(options)

    # Assert
    assert "2 names but there are 3 classes" in message


def test_class_names_must_name_each_class_once(tmp_path):
    # Prepare
    options = write_npz(tmp_path, **tabular(), class_names=np.array(["cat", "dog", "cat"]))

    # Execute
    message = load_error(options)

    # Assert
    assert "'class_names' names more than one class 'cat'" in message


def test_a_file_that_is_not_an_archive_is_a_data_error(tmp_path):
    # Prepare: a CSV file with the wrong name (numpy takes it for a pickle)
    path = tmp_path / "data.npz"
    path.write_text("a,b\n1,2\n")

    # Execute
    message = load_error(DataOptions(path=path))

    # Assert
    assert f"{path} is not a .npz archive: it starts with b'a,b" in message and "unpickl" not in message


@pytest.mark.parametrize("declared", [{}, {"num_classes": np.array(10**12 + 1)}])
def test_a_huge_label_is_refused_before_anything_is_sized_by_it(declared, tmp_path):
    # Prepare: an id where a class index belongs would size a 10^12-class model
    y = np.arange(20) % 2
    y[3] = 10**12
    options = write_npz(tmp_path, x=RNG.random((20, 2)), y=y, **declared)

    # Execute
    message = load_error(options)

    # Assert
    assert "'y' holds the label 1000000000000" in message and "0..K-1" in message


def test_uint64_labels_are_range_checked_before_the_cast(tmp_path):
    # Prepare: 2**63 + 5 wraps to a negative number when cast to int64
    y = (np.arange(20) % 2).astype(np.uint64)
    y[0] = 2**63 + 5
    options = write_npz(tmp_path, x=RNG.random((20, 2)), y=y)

    # Execute
    message = load_error(options)

    # Assert
    assert "'y' holds the label 9223372036854775813" in message


def test_small_uint64_labels_are_accepted(tmp_path):
    # Prepare
    options = write_npz(tmp_path, x=RNG.random((20, 2)), y=(np.arange(20) % 2).astype(np.uint64))

    # Execute
    data = load_dataset("npz", options)

    # Assert
    assert data.num_classes == 2 and data.train.y.dtype == torch.int64


def test_a_single_class_is_a_data_error(tmp_path):
    # Prepare
    options = write_npz(tmp_path, x=RNG.random((20, 2)), y=np.full(20, 3))

    # Execute
    message = load_error(options)

    # Assert
    assert "'y' holds a single class [3]; need at least two" in message


def test_labels_that_leave_classes_unused_are_refused_without_num_classes(tmp_path):
    # Prepare: labels {0, 1, 2, 1000} would silently build a 1001-class model
    y = np.arange(20) % 3
    y[5] = 1000
    options = write_npz(tmp_path, x=RNG.random((20, 2)), y=y)

    # Execute
    message = load_error(options)

    # Assert
    assert "997 of the classes 0..1000 never occur (3, 4, 5, 6, 7, ...)" in message
    assert "0..K-1" in message and "'num_classes'" in message


def test_declared_num_classes_allows_classes_without_examples(tmp_path):
    # Prepare
    y = np.arange(20) % 3
    y[5] = 9
    options = write_npz(tmp_path, x=RNG.random((20, 2)), y=y, num_classes=np.array(12))

    # Execute
    data = load_dataset("npz", options)

    # Assert
    assert data.num_classes == 12
    assert 9 in torch.cat([data.train.y, data.val.y, data.test.y]).tolist()


def test_test_classes_that_training_never_holds_are_refused_without_num_classes(tmp_path):
    # Prepare: y holds classes 0..2, y_test 0..4; together every class 0..4 occurs
    x, y = RNG.random((60, 2)), np.arange(60) % 3
    options = write_npz(tmp_path, x=x, y=y, x_test=RNG.random((60, 2)), y_test=np.arange(60) % 5)

    # Execute
    message = load_error(options)

    # Assert
    assert "y_test holds 2 class(es) that y never does (3, 4)" in message


def test_declared_num_classes_allows_test_classes_without_training_examples(tmp_path):
    options = write_npz(tmp_path, x=RNG.random((60, 2)), y=np.arange(60) % 3, x_test=RNG.random((60, 2)),
                        y_test=np.arange(60) % 5, num_classes=np.array(5))
    assert load_dataset("npz", options).num_classes == 5


def write_truncated(path: Path) -> None:
    np.savez(path, **tabular())
    path.write_bytes(path.read_bytes()[:100])


def write_single_array(path: Path) -> None:
    with path.open("wb") as handle:  # np.save given a name would append .npy to it
        np.save(handle, np.zeros(3))


@pytest.mark.parametrize(("write", "fragment"), [
    (write_truncated, "not a readable .npz archive (File is not a zip file)"),
    (lambda path: path.write_bytes(b""), "not a readable .npz archive"),
    (write_single_array, "holds a single array, not a .npz archive"),
])
def test_a_broken_archive_gets_its_own_message_not_the_unpickling_one(write, fragment, tmp_path):
    # Prepare
    path = tmp_path / "data.npz"
    write(path)

    # Execute
    message = load_error(DataOptions(path=path))

    # Assert
    assert fragment in message and "unpickl" not in message


def test_class_names_that_are_not_utf8_are_a_data_error(tmp_path):
    # Prepare
    options = write_npz(tmp_path, **tabular(), class_names=np.array([b"a", b"\xff", b"c"]))

    # Execute
    message = load_error(options)

    # Assert
    assert "'class_names'" in message and "UTF-8" in message


def test_a_huge_declared_num_classes_is_a_data_error(tmp_path):
    # Prepare
    options = write_npz(tmp_path, **tabular(), num_classes=np.array(10**12))

    # Execute
    message = load_error(options)

    # Assert
    assert "'num_classes' is 1000000000000; at most 100000" in message


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_a_needed_key_that_is_not_a_numpy_array_is_a_data_error(tmp_path):
    # Prepare: a zip member without the .npy suffix comes back from numpy as raw bytes
    path = tmp_path / "data.npz"
    write_zip(path, {"x.npy": npy_bytes(RNG.random((20, 2))), "y": b"0,1,0,1"})

    # Execute
    message = load_error(DataOptions(path=path))

    # Assert
    assert "member 'y' is not a numpy array" in message


def test_other_members_of_the_archive_are_ignored(tmp_path):
    # Prepare
    path = tmp_path / "data.npz"
    write_zip(path, {"x.npy": npy_bytes(RNG.random((20, 2))), "y.npy": npy_bytes(np.arange(20) % 2),
                     "README.txt": b"made by hand"})

    # Execute
    data = load_dataset("npz", DataOptions(path=path))

    # Assert
    assert data.num_classes == 2 and data.input_shape == (2,)


def test_rgba_images_stored_channels_last_become_nchw(tmp_path):
    # (N, H, W, 4) was read as 16 channels of 16x4 images
    x = RNG.random((10, 16, 16, 4)).astype(np.float32)
    data = load_dataset("npz", write_npz(tmp_path, x=x, y=np.arange(10) % 2))
    assert data.input_shape == (4, 16, 16)


def test_images_of_an_ambiguous_layout_are_refused(tmp_path):
    options = write_npz(tmp_path, x=RNG.random((10, 3, 8, 4)).astype(np.float32), y=np.arange(10) % 2)
    assert "cannot tell channels first from channels last" in load_error(options)


@pytest.mark.parametrize(("shape", "loaded"), [((10, 1, 4, 4), (1, 4, 4)), ((10, 4, 4, 3), (3, 4, 4))])
def test_a_shape_that_reads_both_ways_takes_the_square_image(tmp_path, shape, loaded):
    x = RNG.random(shape).astype(np.float32)
    assert load_dataset("npz", write_npz(tmp_path, x=x, y=np.arange(10) % 2)).input_shape == loaded


def test_images_with_other_channel_counts_stay_channels_first(tmp_path):
    x = RNG.random((10, 8, 6, 6)).astype(np.float32)
    assert load_dataset("npz", write_npz(tmp_path, x=x, y=np.arange(10) % 2)).input_shape == (8, 6, 6)


# -- layouts, precision, keys and sizes the file must make certain ----------------------------------

@pytest.mark.parametrize("shape, layout, expected", [
    ((12, 16, 16, 8), None, (8, 16, 16)),  # 8 bands, channels last: was read as 16 channels of 16x8
    ((12, 8, 16, 16), None, (8, 16, 16)),  # 8 bands, channels first
    ((12, 28, 28, 2), None, (2, 28, 28)),
    ((12, 8, 16, 32), "NCHW", (8, 16, 32)),  # non-square multi-band: the file says which
    ((12, 16, 32, 8), "NHWC", (8, 16, 32)),
])
def test_a_layout_the_shape_or_the_file_makes_certain_is_read(tmp_path, shape, layout, expected):
    arrays = {"x": RNG.random(shape).astype(np.float32), "y": np.arange(shape[0]) % 2}
    if layout is not None:
        arrays["layout"] = np.array(layout)
    assert DATASETS.get("npz")(write_npz(tmp_path, **arrays)).input_shape == expected


def test_a_layout_the_shape_cannot_tell_is_refused_with_the_way_out(tmp_path):
    options = write_npz(tmp_path, x=RNG.random((12, 8, 16, 32)), y=np.arange(12) % 2)
    assert "cannot tell channels first from channels last" in load_error(options)
    assert "np.array('NCHW')" in load_error(options)


def test_values_on_the_sides_of_a_declared_box_stay_inside_it_in_float32(tmp_path):
    # float32(-0.3) lies below -0.3: the box's sides are rounded outward to float32 numbers
    x = np.tile(np.array([-0.3, 0.3]), (10, 1))
    data = DATASETS.get("npz")(write_npz(tmp_path, x=x, y=np.arange(10) % 2, bounds=np.array([-0.3, 0.3])))
    low, high = data.bounds
    assert low <= -0.3 and high >= 0.3 and np.float32(low) == low and np.float32(high) == high
    assert float(data.train.x.min()) >= low and float(data.train.x.max()) <= high


def test_finite_values_beyond_float32_are_reported_as_out_of_the_box_not_as_nan(tmp_path):
    options = write_npz(tmp_path, x=np.full((10, 2), 1e39), y=np.arange(10) % 2)
    message = load_error(options)
    assert "outside the declared box" in message and "NaN" not in message


def test_a_misspelt_array_key_is_refused(tmp_path):
    options = write_npz(tmp_path, **tabular(), x_tset=RNG.random((5, 4)))
    assert "unknown key(s) ['x_tset']" in load_error(options)


def test_rows_without_features_are_refused(tmp_path):
    options = write_npz(tmp_path, x=np.zeros((10, 0)), y=np.arange(10) % 2)
    assert "its rows hold no features" in load_error(options)


def _member_data_start(raw: bytes, path: Path, member: str) -> int:
    """Where a member's (stored or deflated) bytes begin, past its local header."""
    offset = zipfile.ZipFile(path).getinfo(member).header_offset
    name_length, extra_length = struct.unpack("<HH", raw[offset + 26:offset + 30])
    return offset + 30 + name_length + extra_length


@pytest.mark.parametrize(("save", "position", "fragment"), [
    (np.savez_compressed, slice(20, 60), "Error -3 while decompressing data"),
    (np.savez, slice(200, 201), "Bad CRC-32 for file 'x.npy'"),
], ids=["deflate-stream", "crc"])
def test_a_damaged_member_is_a_data_error(tmp_path, save, position, fragment):
    # Prepare: bytes flipped inside the member x.npy
    path = tmp_path / "data.npz"
    save(path, x=RNG.random((50, 4)).astype(np.float32), y=np.arange(50) % 3)
    raw = bytearray(path.read_bytes())
    start = _member_data_start(raw, path, "x.npy")
    for i in range(start + position.start, start + position.stop):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    # Execute
    message = load_error(DataOptions(path=path))
    # Assert
    assert "is not a readable .npz archive" in message and fragment in message


def test_a_member_whose_zip_entry_also_claims_the_forged_size_is_refused(tmp_path):
    # Prepare: an .npy header declaring 4 PiB, and a zip64 directory entry that claims as much, so
    # that the directory's size agrees with the header; the file itself is under 1 kB
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (2**40, 1024)})
    path = tmp_path / "data.npz"
    write_zip(path, {"x.npy": header.getvalue() + b"\0" * 64, "y.npy": npy_bytes(np.arange(10) % 2)})
    path.write_bytes(_with_zip64_size(path.read_bytes(), b"x.npy", 2**52 + len(header.getvalue())))
    assert zipfile.ZipFile(path).getinfo("x.npy").file_size > 2**52
    # Execute
    message = load_error(DataOptions(path=path))
    # Assert: refused from what the member's stored bytes can hold, before numpy allocates
    assert "declares shape (1099511627776, 1024)" in message and "damaged or forged" in message


def _with_zip64_size(raw: bytes, name: bytes, size: int) -> bytes:
    """The archive with ``name``'s central-directory sizes moved into a zip64 field set to ``size``."""
    raw = bytearray(raw)
    end = raw.rfind(b"PK\x05\x06")
    directory_size, directory_offset = struct.unpack("<II", raw[end + 12:end + 20])
    directory = raw[directory_offset:directory_offset + directory_size]
    rewritten, position = bytearray(), 0
    while position < len(directory):
        n, e, c = struct.unpack("<HHH", directory[position + 28:position + 34])
        entry = bytearray(directory[position:position + 46 + n + e + c])
        if bytes(entry[46:46 + n]) == name:
            entry[20:28] = b"\xff" * 8  # compressed and uncompressed sizes: see the zip64 field
            zip64 = struct.pack("<HHQQ", 1, 16, size, size)
            entry[30:32] = struct.pack("<H", e + len(zip64))
            entry = entry[:46 + n] + zip64 + entry[46 + n:]
        rewritten += entry
        position += 46 + n + e + c
    raw = raw[:directory_offset] + rewritten + raw[directory_offset + directory_size:]
    end = raw.rfind(b"PK\x05\x06")
    raw[end + 12:end + 16] = struct.pack("<I", len(rewritten))
    return bytes(raw)


def test_a_member_that_declares_more_data_than_it_holds_is_refused_before_allocating(tmp_path):
    # a small member whose header declares 36 TiB: numpy would allocate the declared size first
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10_000_000, 1_000_000)})
    path = tmp_path / "data.npz"
    write_zip(path, {"x.npy": header.getvalue() + b"\0" * 16, "y.npy": npy_bytes(np.arange(10) % 2)})
    message = load_error(DataOptions(path=path))
    assert "declares shape (10000000, 1000000)" in message and "damaged or forged" in message


@pytest.mark.parametrize("method", [zipfile.ZIP_LZMA, zipfile.ZIP_BZIP2], ids=["lzma", "bzip2"])
def test_an_archive_compressed_past_deflates_ratio_by_another_method_is_read(tmp_path, method):
    # Prepare: 20,000 blank images, which LZMA and bzip2 squeeze far past deflate's 1032:1
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        archive.writestr("x.npy", npy_bytes(np.zeros((20_000, 1, 8, 8), dtype=np.float32)))
        archive.writestr("y.npy", npy_bytes(np.arange(20_000) % 2))
    assert path.stat().st_size * 1032 < 20_000 * 64 * 4
    # Execute
    data = load_dataset("npz", DataOptions(path=path, val_fraction=0.2, test_fraction=0.2, seed=0))
    # Assert
    assert len(data.train) + len(data.val) + len(data.test) == 20_000


def test_a_class_the_split_puts_only_in_test_or_validation_is_refused(tmp_path):
    # one example of class 2: the seeded split put it in the test split, and the model was scored on
    # a class it never saw (the CSV loader and y_test already refused that)
    y = np.r_[np.zeros(50, int), np.ones(49, int), [2]]
    options = write_npz(tmp_path, x=RNG.random((100, 5)), y=y)
    message = load_error(DataOptions(path=options.path, seed=4))
    assert "class(es) 2 of y fell entirely into the test split" in message
    # with a fixed test split, validation is carved out of y: the class may fall there alone
    both = write_npz(tmp_path, x=RNG.random((100, 5)), y=y, x_test=RNG.random((6, 5)),
                     y_test=np.arange(6) % 3)
    assert "fell entirely into the validation split" in load_error(DataOptions(path=both.path, seed=30))


def _also_in_training(split, train) -> int:
    """Rows of ``split`` equal to some training row, counted by comparing every pair."""
    return int((split.x[:, None, :] == train.x[None, :, :]).all(dim=2).any(dim=1).sum())


def test_held_out_copies_of_training_inputs_are_counted_and_warned_of(tmp_path):
    # Prepare: 20 of 60 rows repeat others, some under another label
    arrays = tabular(n=60)
    arrays["x"][40:] = arrays["x"][:20]
    arrays["y"][50:] = (arrays["y"][10:20] + 1) % 3
    options = write_npz(tmp_path, **arrays)

    # Execute
    with pytest.warns(UserWarning, match="also appear in the training split") as caught:
        data = load_dataset("npz", options)

    # Assert: the counts a pairwise comparison gives, in the summary and in the one warning
    seen = {"validation": _also_in_training(data.val, data.train),
            "test": _also_in_training(data.test, data.train)}
    assert seen["test"] > 0 and seen["validation"] > 0
    assert data.summary()["inputs_also_in_train"] == seen
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"{seen['test']} of {len(data.test)} test inputs" in message
    assert f"{seen['validation']} of {len(data.val)} validation inputs" in message


def test_copies_inside_the_test_split_alone_load_without_a_warning(tmp_path, recwarn):
    train, held_out = tabular(n=60), tabular(n=10)
    twice = {"x_test": np.concatenate([held_out["x"]] * 2), "y_test": np.concatenate([held_out["y"]] * 2)}
    data = load_dataset("npz", write_npz(tmp_path, **train, **twice))
    assert "inputs_also_in_train" not in data.summary()
    assert not [w for w in recwarn if "training split" in str(w.message)]
