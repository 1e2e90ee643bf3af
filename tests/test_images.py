"""Image folders and CIFAR archives: layout, labels, pixels, bad input, and safe unpickling."""

import pickle
import shutil
import struct

import numpy as np
import pytest
from PIL import Image, ImageFile

from kdcore.data.cifar import load_batch, read_cifar
from kdcore.data.images import is_image_source, open_images, read_image
from kdcore.errors import DataError

CLASSES = ("cat", "ant", "bee")  # created out of order: classes are the sorted names


def pixel(c: int, i: int) -> tuple[int, int, int]:
    """The colour of image ``i`` of class ``c``: every pixel different between images."""
    return (10 * c + i, 100 + i, 200 - c)


def make_folder(root, *, splits=("train", "test"), n=4, size=(8, 8), unlabelled=0,
                suffix=".png"):
    """root/<split>/<class>/<i>.png, uniform colour pixel(c, i), with pixel (0, 0) marked."""
    for split in splits:
        for c, name in enumerate(sorted(CLASSES)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                image = np.full((*size, 3), pixel(c, i), dtype=np.uint8)
                image[0, 0] = (255, 0, 7)
                Image.fromarray(image).save(folder / f"{i:03d}{suffix}")
    if unlabelled:
        (root / "unlabelled").mkdir()
        for i in range(unlabelled):
            Image.fromarray(np.full(size, 50 + i, np.uint8)).save(root / "unlabelled" / f"u{i}.png")
    return root


def message(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# --- image folders -----------------------------------------------------------------------


def test_folder_counts_ids_labels_and_sorted_class_order(tmp_path):
    source = open_images(make_folder(tmp_path, unlabelled=3))
    assert source.kind == "folder" and source.root == tmp_path.resolve()
    assert source.class_names == ["ant", "bee", "cat"]
    assert source.splits == ["train", "unlabelled", "test"]
    assert [source.n(s) for s in source.splits] == [12, 3, 12]
    assert list(source.sample_ids("train")[:5]) == [
        "train/ant/000.png", "train/ant/001.png", "train/ant/002.png", "train/ant/003.png",
        "train/bee/000.png"]
    assert list(source.labels("test")) == [0] * 4 + [1] * 4 + [2] * 4
    assert source.labels("test").dtype == np.int64
    assert source.labels("unlabelled") is None
    assert list(source.sample_ids("unlabelled")) == [f"unlabelled/u{i}.png" for i in range(3)]
    assert source.image_shape == (3, 8, 8)
    with pytest.raises(DataError, match="no 'val' split"):
        source.n("val")


def test_iter_batches_yields_pixels_in_sample_order_one_batch_at_a_time(tmp_path):
    source = open_images(make_folder(tmp_path, splits=("train",)))
    batches = list(source.iter_batches("train", 5))
    assert [len(ids) for ids, _, _ in batches] == [5, 5, 2]
    ids = np.concatenate([b[0] for b in batches])
    x = np.concatenate([b[1] for b in batches])
    y = np.concatenate([b[2] for b in batches])
    assert list(ids) == list(source.sample_ids("train")) and list(y) == list(source.labels("train"))
    assert x.dtype == np.float32 and x.shape == (12, 3, 8, 8)
    row = list(ids).index("train/bee/002.png")
    np.testing.assert_allclose(x[row, :, 3, 5], np.array(pixel(1, 2)) / 255, rtol=1e-6)
    np.testing.assert_allclose(x[row, :, 0, 0], np.array([255, 0, 7]) / 255, rtol=1e-6)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_resize_and_channel_conversion(tmp_path):
    source = open_images(make_folder(tmp_path, splits=("train",), size=(8, 6)))
    assert source.image_shape == (3, 8, 6)
    ids, x, _ = next(source.iter_batches("train", 3, size=(4, 12)))
    assert x.shape == (3, 3, 4, 12)
    np.testing.assert_allclose(x[1, :, 2, 8], np.array(pixel(0, 1)) / 255, atol=1e-6)
    _, grey, _ = next(source.iter_batches("train", 3, channels=1))
    expected = Image.fromarray(np.full((1, 1, 3), pixel(0, 1), np.uint8)).convert("L")
    assert grey.shape == (3, 1, 8, 6)
    assert grey[1, 0, 4, 4] == pytest.approx(np.asarray(expected)[0, 0] / 255)
    with pytest.raises(DataError, match="two positive integers"):
        source.iter_batches("train", 3, size=(0, 4))
    with pytest.raises(DataError, match="give 1 .grey. or 3"):
        source.iter_batches("train", 3, channels=4)


def test_grey_folder_stays_one_channel_unless_asked(tmp_path):
    for i, name in enumerate(["a", "b"]):
        (tmp_path / "train" / name).mkdir(parents=True)
        grey = Image.fromarray(np.full((5, 7), 40 * i + 10, np.uint8))
        grey.save(tmp_path / "train" / name / "x.png")
    source = open_images(tmp_path)
    assert source.image_shape == (1, 5, 7) and source.channels == 1
    _, x, _ = next(source.iter_batches("train", 2))
    assert x.shape == (2, 1, 5, 7) and x[1, 0, 2, 2] == pytest.approx(50 / 255)
    _, rgb, _ = next(source.iter_batches("train", 2, channels=3))
    assert rgb.shape == (2, 3, 5, 7) and np.all(rgb[1] == x[1, 0])


def test_sixteen_bit_and_palette_images_scale_to_unit_range(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 65535 // 5, np.uint16)).save(folder / "deep.png")
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    source = open_images(tmp_path)
    assert source.image_shape == (3, 4, 4)  # a colour image among them: RGB
    _, x, _ = next(source.iter_batches("train", 2))
    assert x[0, :, 1, 1] == pytest.approx([0.2] * 3, abs=1e-4)
    assert x[1, :, 1, 1] == pytest.approx([0, 128 / 255, 1], abs=1e-6)


def test_mixed_sizes_need_image_size(tmp_path):
    make_folder(tmp_path, splits=("train",))
    Image.new("RGB", (9, 7)).save(tmp_path / "train" / "bee" / "010.png")
    source = open_images(tmp_path)
    assert source.image_shape is None and source.channels == 3
    with pytest.raises(DataError) as exc:
        source.iter_batches("train", 4)  # raised by the call, before any batch is asked for
    text = message(exc)
    assert "train/bee/010.png: 7x9 pixels" in text and "--image-size" in text
    _, x, _ = next(source.iter_batches("train", 20, size=(8, 8)))
    assert x.shape == (13, 3, 8, 8)


def test_non_image_and_hidden_files_are_skipped_and_listed(tmp_path):
    make_folder(tmp_path, splits=("train",))
    (tmp_path / "train" / "ant" / "notes.txt").write_text("x")
    (tmp_path / "train" / "ant" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "train" / ".cache").mkdir()
    (tmp_path / "train" / "bee" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "bee" / "more" / "x.JPG")
    source = open_images(tmp_path)
    assert source.class_names == ["ant", "bee", "cat"]
    assert source.skipped == ["train/ant/notes.txt"]
    ids = list(source.sample_ids("train"))
    assert len(ids) == 13  # ImageFolder's order: a folder's files, then its sub-folders
    assert ids[ids.index("train/bee/003.png") + 1] == "train/bee/more/x.JPG"


def test_load_image_and_read_image(tmp_path):
    source = open_images(make_folder(tmp_path, splits=("train",)))
    image = source.load_image("train/cat/001.png")
    assert image.size == (8, 8) and image.getpixel((3, 3)) == pixel(2, 1)
    assert read_image(tmp_path, "train/cat/001.png").getpixel((0, 0)) == (255, 0, 7)
    with pytest.raises(DataError, match="no such image"):
        source.load_image("train/cat/404.png")
    with pytest.raises(DataError, match="not a sample id"):
        source.load_image("../outside.png")


BAD_FOLDERS = {
    "no train folder": (lambda r: (r / "train").rename(r / "training"), "no train/ folder"),
    "no class folders": (lambda r: [shutil.rmtree(p) for p in (r / "train").iterdir()],
                         "train: no class folders"),
    "empty class": (lambda r: (r / "train" / "dog").mkdir(),
                    "train/dog: an empty class folder"),
    "test class not in train": (lambda r: shutil.copytree(r / "train" / "ant", r / "test" / "dog"),
                                "test/dog: class 'dog' is not in train/"),
    "class folders in unlabelled": (lambda r: (r / "unlabelled" / "ant").mkdir(parents=True),
                                    "unlabelled/ant: a folder inside unlabelled/"),
    "empty unlabelled": (lambda r: (r / "unlabelled").mkdir(), "unlabelled: no images"),
    "image outside a class folder": (lambda r: Image.new("RGB", (8, 8)).save(r / "train" / "x.png"),
                                     "train/x.png: an image outside a class folder"),
    "val split": (lambda r: (r / "val").mkdir(), "rename val/ to test/"),
    "not an image": (lambda r: (r / "train" / "ant" / "bad.png").write_bytes(b"not a png"),
                     "train/ant/bad.png: not a readable image"),
    "truncated png": (lambda r: (r / "train" / "ant" / "000.png").write_bytes(
        (r / "train" / "ant" / "000.png").read_bytes()[:-20]),
        "000.png: the PNG file is truncated"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_is_one_line_naming_the_path_and_the_fix(tmp_path, case):
    make_folder(tmp_path, splits=("train",))
    damage, expected = BAD_FOLDERS[case]
    damage(tmp_path)
    with pytest.raises(DataError) as exc:
        open_images(tmp_path)
    assert expected in message(exc) and str(tmp_path.resolve()) in message(exc)


def test_truncated_jpeg_fails_when_decoded_naming_the_file(tmp_path):
    make_folder(tmp_path, splits=("train",), size=(64, 64), suffix=".jpg")
    path = tmp_path / "train" / "bee" / "002.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    source = open_images(tmp_path)  # the header is intact
    with pytest.raises(DataError) as exc:
        list(source.iter_batches("train", 4))
    assert f"{path.resolve()}: cannot decode the image" in message(exc)


def test_missing_path_file_and_is_image_source(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        open_images(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="a file, not a folder"):
        open_images(tmp_path / "file.png")
    assert not is_image_source(tmp_path) and not is_image_source(tmp_path / "file.png")
    assert is_image_source(make_folder(tmp_path / "images", splits=("train",)))
    assert is_image_source(write_cifar(tmp_path / "c10").parent)


def test_opening_reads_headers_only(tmp_path, monkeypatch):
    """Opening 2,000 images decodes none; decoding happens batch by batch."""
    for c in range(2):
        folder = tmp_path / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(1000):
            Image.new("L", (2, 2), i % 256).save(folder / f"{i:04d}.png")
    decoded = set()
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: decoded.add(self.filename) or original(self))
    source = open_images(tmp_path)
    assert source.n("train") == 2000 and decoded == set()
    batches = source.iter_batches("train", 64)
    next(batches)
    assert len(decoded) == 64


# --- CIFAR -------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes as Python 2's cPickle did: text and bytes as py2 str (BINSTRING), and numpy's
    reconstructor under numpy.core, the way the official CIFAR files hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if self.proto == 0:
            self.write(pickle.STRING + repr(data)[1:].encode("ascii") + b"\n")
        elif len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if name == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def dump_py3(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def dump_py2(obj, path):
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def dump_py2_text(obj, path):
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=0).dump(obj)


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar(root, *, variant=10, n=3, dump=dump_py3):
    """A small archive in the official layout: CIFAR-10 with 5 training batches of ``n`` rows,
    or CIFAR-100 with one; labels cycle through the classes."""
    classes = 10 if variant == 10 else 100
    if variant == 10:
        folder, meta, names_key, labels_key = root / "cifar-10-batches-py", "batches.meta", \
            b"label_names", b"labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        folder, meta, names_key, labels_key = root / "cifar-100-python", "meta", \
            b"fine_label_names", b"fine_labels"
        files = ["train", "test"]
    folder.mkdir(parents=True)
    dump({names_key: [f"class{i}".encode() for i in range(classes)], b"num_vis": 3072},
         folder / meta)
    for k, name in enumerate(files):
        batch = {b"batch_label": name.encode(), labels_key: [(k * n + i) % classes
                                                             for i in range(n)],
                 b"data": cifar_rows(n, k), b"filenames": [b"x.png"] * n}
        if variant == 100:
            batch[b"coarse_labels"] = [0] * n
        dump(batch, folder / name)
    return folder


@pytest.mark.parametrize("dump", [dump_py3, dump_py2, dump_py2_text],
                         ids=["python3", "python2", "python2-protocol0"])
def test_cifar10_reads_the_official_layout(tmp_path, dump):
    folder = write_cifar(tmp_path, dump=dump)
    source = open_images(tmp_path)  # the parent works, as does the folder itself
    assert source.kind == "cifar" and source.root == folder.resolve()
    assert open_images(folder).class_names == source.class_names == [f"class{i}" for i in range(10)]
    assert source.splits == ["train", "test"] and (source.n("train"), source.n("test")) == (15, 3)
    assert list(source.sample_ids("train")[2:5]) == ["data_batch_1/2", "data_batch_2/0",
                                                      "data_batch_2/1"]
    assert list(source.labels("train")) == [i % 10 for i in range(15)]
    assert source.image_shape == (3, 32, 32)
    ids, x, y = next(source.iter_batches("train", 4))
    rows = cifar_rows(3, 1)  # data_batch_2
    # row 0 of data_batch_2 is sample 3; its pixel (h=1, w=2) is at 32 + 2 in each colour plane
    assert ids[3] == "data_batch_2/0"
    np.testing.assert_allclose(x[3, :, 1, 2], rows[0, [34, 1024 + 34, 2048 + 34]] / 255)
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    image = source.load_image("data_batch_2/0")
    assert image.size == (32, 32) and image.getpixel((2, 1)) == tuple(rows[0, [34, 1058, 2082]])
    _, small, _ = next(source.iter_batches("test", 3, size=(8, 8), channels=1))
    assert small.shape == (3, 1, 8, 8)


def test_cifar100_uses_fine_labels(tmp_path):
    source = open_images(write_cifar(tmp_path, variant=100, n=7))
    assert len(source.class_names) == 100 and source.class_names[99] == "class99"
    assert list(source.sample_ids("test")[:2]) == ["test/0", "test/1"]
    assert list(source.labels("test")) == list(range(7, 14))


class Payload:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.eval", "object array"])
def test_malicious_cifar_pickle_is_refused_before_it_runs(tmp_path, how):
    import builtins
    import os

    marker = tmp_path / "pwned"
    folder = write_cifar(tmp_path / "c")
    payload = {"os.system": Payload(os.system, f"touch {marker}"),
               "builtins.eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
               "object array": np.array([1, "x"], dtype=object)}[how]
    batch = {b"data": cifar_rows(3, 0), b"labels": [0, 1, 2], b"extra": payload}
    dump_py3(batch, folder / "data_batch_3")
    with pytest.raises(DataError) as exc:
        open_images(folder)
    text = message(exc)
    assert "data_batch_3: holds" in text and "not part of a CIFAR batch; it is not loaded" in text
    assert {"os.system": "system,", "builtins.eval": "eval,",
            "object array": "numpy"}[how] in text
    assert not marker.exists()


BAD_CIFAR = {
    "data shape": ({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]},
                   "not (n, 3072) uint8"),
    "data dtype": ({b"data": np.zeros((3, 3072), np.float32), b"labels": [0, 1, 2]},
                   "float32 of shape (3, 3072)"),
    "label count": ({b"data": cifar_rows(3, 0), b"labels": [0, 1]}, "2 labels for 3 images"),
    "label range": ({b"data": cifar_rows(3, 0), b"labels": [0, 10, 1]},
                    "label 10 at row 1 is outside 0...9"),
    "no labels": ({b"data": cifar_rows(3, 0)}, "no 'labels' entry"),
    "not a dict": ([1, 2, 3], "holds a list"),
}


@pytest.mark.parametrize("case", list(BAD_CIFAR))
def test_bad_cifar_batches(tmp_path, case):
    folder = write_cifar(tmp_path)
    batch, expected = BAD_CIFAR[case]
    dump_py3(batch, folder / "data_batch_4")
    with pytest.raises(DataError) as exc:
        read_cifar(folder)
    assert f"data_batch_4: {expected}" in message(exc) or expected in message(exc)


def test_missing_or_truncated_cifar_files(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5: missing from the CIFAR folder"):
        read_cifar(folder)
    dump_py3({b"data": cifar_rows(3, 0), b"labels": [0, 1, 2]}, folder / "data_batch_5")
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:200])
    with pytest.raises(DataError, match="test_batch: not a readable CIFAR batch"):
        read_cifar(folder)


@pytest.mark.parametrize("payload, refused", [
    (b"\x80\x02cnumpy\nndarray\nK\x03\x85R.", "a call of numpy.ndarray"),
    (b"\x80\x02cnumpy\nndarray\n}X\x03\x00\x00\x00fooK\x01sb.", "state for a numpy"),
    (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.",
     "a _codecs.encode call other than text to latin1"),
    (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R.", "a numpy dtype 'O8'"),
], ids=["ndarray call", "state on a global", "other codec", "object dtype"])
def test_cifar_globals_allow_only_what_a_batch_needs(tmp_path, payload, refused):
    (tmp_path / "batch").write_bytes(payload)
    with pytest.raises(DataError, match=f"holds {refused}.*not part of a CIFAR batch"):
        load_batch(tmp_path / "batch")
