"""Tests for micronet.data: readers, validation errors, splits, augmentation and deterministic batching."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from micronet.data import (
    ArrayDataset,
    Augment,
    BatchLoader,
    DatasetInfo,
    crop_with_padding,
    default_augment,
    list_datasets,
    load_dataset,
    register_dataset,
)
from micronet.data import registry as registry_module
from micronet.data.idx import read_idx, write_idx
from micronet.data.safe_pickle import load_restricted_pickle
from micronet.errors import ConfigError, DatasetError, MicronetError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- helpers / fixtures


def _info(n_classes: int = 3, channels: int = 1, size: tuple[int, int] = (4, 4), mean=None, std=None) -> DatasetInfo:
    return DatasetInfo(
        "toy", n_classes, channels, size,
        mean if mean is not None else (0.5,) * channels,
        std if std is not None else (0.25,) * channels,
        tuple(f"c{i}" for i in range(n_classes)),
    )


def _indexed_dataset(n: int, n_classes: int = 3) -> ArrayDataset:
    """Image i carries its index in pixels (0,0,0)=i%256 and (0,0,1)=i//256, so order can be read back."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    idx = torch.arange(n)
    images[:, 0, 0, 0] = (idx % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (idx // 256).to(torch.uint8)
    return ArrayDataset(images, idx % n_classes, _info(n_classes))


def _indices_of(x: torch.Tensor, info: DatasetInfo) -> list[int]:
    """Invert normalisation and read the index pixels written by _indexed_dataset."""
    raw = (x * info.std[0] + info.mean[0]) * 255.0
    raw = raw.round().to(torch.int64)
    return (raw[:, 0, 0, 0] + 256 * raw[:, 0, 0, 1]).tolist()


@pytest.fixture
def toy_registry(monkeypatch):
    """Register an indexed toy dataset without leaking it into the global registry."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    def loader(root, n_train: int = 300, n_test: int = 60):
        return _indexed_dataset(n_train), _indexed_dataset(n_test)

    register_dataset("toy-index", loader)
    return "toy-index"


def _write_fake_fashion(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))


def _fake_cifar_batch(n: int, offset: int) -> dict:
    rng = np.random.default_rng(offset)
    return {
        b"batch_label": b"fake batch",
        b"labels": [int((offset + i) % 10) for i in range(n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{offset + i}.png".encode() for i in range(n)],
    }


def _write_fake_cifar_py(folder: Path, n: int = 6, meta: bool = True) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = _fake_cifar_batch(n if name != "test_batch" else 4, offset=i * n)
        with open(folder / name, "wb") as fh:
            pickle.dump(batches[name], fh, protocol=2)
    if meta:
        names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
        with open(folder / "batches.meta", "wb") as fh:
            pickle.dump({b"label_names": names, b"num_vis": 3072}, fh, protocol=2)
    return batches


def _png(path: Path, size: tuple[int, int] = (8, 8), mode: str = "L", value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, (size[1], size[0]), color).save(path)


def _imagefolder(root: Path, test_name: str = "test", classes=("cat", "dog"), mode: str = "L") -> Path:
    for split, n in (("train", 3), (test_name, 2)):
        for ci, c in enumerate(classes):
            for i in range(n):
                _png(root / split / c / f"{i}.png", mode=mode, value=40 + 100 * ci + i)
    return root


# ---------------------------------------------------------------- DatasetInfo / ArrayDataset


def test_dataset_info_json_round_trip():
    info = _info(3, 3, (5, 6), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    d = json.loads(json.dumps(info.to_json()))
    assert DatasetInfo.from_json(d) == info
    assert DatasetInfo.from_json(d).image_size == (5, 6)


def test_dataset_info_rejects_inconsistent_fields():
    with pytest.raises(DatasetError, match="channels"):
        DatasetInfo("x", 2, 3, (4, 4), (0.5,), (0.5,), ("a", "b"))
    with pytest.raises(DatasetError, match="missing"):
        DatasetInfo.from_json({"name": "x"})


def test_array_dataset_validates_and_subsets():
    ds = _indexed_dataset(10)
    sub = ds.subset(torch.tensor([7, 2]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 2] and sub.info is ds.info
    assert ds.subset(ds.labels == 0).labels.tolist() == [0, 0, 0, 0]
    with pytest.raises(DatasetError, match="labels"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), _info(3))
    with pytest.raises(DatasetError, match="uint8"):
        ArrayDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), _info(3))


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["a-idx3-ubyte.gz", "a-idx3-ubyte"])
def test_idx_round_trip(tmp_path, name):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / name, arr)
    out = read_idx(tmp_path / name, expected_ndim=3)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 5) and np.array_equal(out, arr)
    assert out.flags.writeable


def test_idx_header_is_written_as_specified(tmp_path):
    write_idx(tmp_path / "l.gz", np.array([1, 2, 3], dtype=np.uint8))
    raw = gzip.decompress((tmp_path / "l.gz").read_bytes())
    assert raw == b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x01\x02\x03"


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00", "magic"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + b"\x00\x00", "data type"),
        (b"\x00\x00\x08\x03" + struct.pack(">3I", 10, 28, 28) + b"\x00" * 100, "data bytes"),  # truncated payload
        (b"\x00\x00\x08\x03" + b"\x00\x00", "header"),
    ],
)
def test_corrupt_idx_names_the_file(tmp_path, raw, words):
    path = tmp_path / "broken-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetError, match=words) as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_idx_wrong_ndim_and_bad_gzip(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((2, 2), np.uint8))
    with pytest.raises(DatasetError, match="2 dimensions but 3"):
        read_idx(tmp_path / "x.gz", expected_ndim=3)
    (tmp_path / "y.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DatasetError, match="gzip") as exc:
        read_idx(tmp_path / "y.gz")
    assert "y.gz" in str(exc.value)


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_missing_dir_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError) as exc:
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    msg = str(exc.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "--data-root" in msg and "nowhere" in msg
    assert isinstance(exc.value, MicronetError)


def test_fashion_mnist_missing_file_is_named(tmp_path):
    _write_fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_fake_folder_uncompressed_and_env_var(tmp_path, monkeypatch):
    _write_fake_fashion(tmp_path / "fm", gz=False)
    monkeypatch.setenv("MICRONET_FASHION_MNIST", str(tmp_path / "fm"))
    s = load_dataset("fashion-mnist", val_fraction=0.0)
    assert (len(s.train), len(s.val), len(s.test)) == (20, 0, 10)
    assert s.train.images.shape == (20, 1, 28, 28) and s.val.images.shape == (0, 1, 28, 28)
    assert s.info.mean == (0.2860,) and s.info.std == (0.3530,)


def test_fashion_mnist_count_mismatch_and_label_range(tmp_path):
    _write_fake_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(DatasetError, match="20 images but .* 19 labels"):
        load_dataset("fashion-mnist", tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(20, 10, np.uint8))
    with pytest.raises(DatasetError, match="label 10") as exc:
        load_dataset("fashion-mnist", tmp_path)
    assert "train-labels-idx1-ubyte.gz" in str(exc.value)


@pytest.fixture(scope="module")
def fashion():
    if not FASHION_ROOT.is_dir():
        pytest.skip(f"{FASHION_ROOT} is absent: install it with `apt-get install -y dataset-fashion-mnist`")
    from micronet.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(FASHION_ROOT)


def _sample_keys(ds: ArrayDataset) -> torch.Tensor:
    """A per-sample fingerprint (a wrapping int32 weighted pixel sum, and the label) for multiset comparisons."""
    w = torch.randint(1, 2**20, (ds.images[0].numel(),), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    flat = ds.images.reshape(len(ds), -1)
    sums = torch.cat([(flat[i : i + 8192].to(torch.int32) * w).sum(1, dtype=torch.int32) for i in range(0, len(ds), 8192)])
    return sums.to(torch.int64) * 16 + ds.labels


def test_real_fashion_mnist_sizes_and_classes(fashion):
    train, test = fashion
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.info.num_classes == 10 and train.info.class_names[0] == "T-shirt/top" and train.info.class_names[9] == "Ankle boot"
    assert train.class_counts().tolist() == [6000] * 10
    assert test.class_counts().tolist() == [1000] * 10


def test_real_fashion_mnist_split_is_a_partition(fashion, monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register_dataset("fm-cached", lambda root: fashion)
    s = load_dataset("fm-cached", val_fraction=0.1, seed=3)
    assert len(s.train) + len(s.val) == 60000 and len(s.val) == 6000
    assert s.val.class_counts().tolist() == [600] * 10  # stratified
    merged = torch.sort(torch.cat([_sample_keys(s.train), _sample_keys(s.val)])).values
    assert torch.equal(merged, torch.sort(_sample_keys(fashion[0])).values)  # union == train, so disjoint
    assert len(s.test) == 10000 and torch.equal(s.test.images, fashion[1].images)


# ---------------------------------------------------------------- CIFAR-10


def test_cifar_python_batches_load(tmp_path):
    batches = _write_fake_cifar_py(tmp_path / "cifar-10-batches-py", n=6)
    for root in (tmp_path / "cifar-10-batches-py", tmp_path):  # the extracted folder or the folder above it
        s = load_dataset("cifar10", root, val_fraction=0.0)
        assert s.train.images.shape == (30, 3, 32, 32) and s.test.images.shape == (4, 3, 32, 32)
        assert s.train.labels.tolist() == [i % 10 for i in range(30)]
        assert s.test.labels.tolist() == [(30 + i) % 10 for i in range(4)]
        # Row = 1024 R, 1024 G, 1024 B, each a row-major 32×32 plane.
        row = batches["data_batch_2"][b"data"][1]
        img = s.train.images[7]
        assert img[1, 2, 3] == row[1024 + 2 * 32 + 3] and img[2, 31, 0] == row[2048 + 31 * 32]
        assert s.info.class_names[:2] == ("plane", "car")
        assert s.info.mean == (0.4914, 0.4822, 0.4465)


def test_cifar_default_class_names_without_meta(tmp_path):
    _write_fake_cifar_py(tmp_path, meta=False)
    assert load_dataset("cifar10", tmp_path).info.class_names[0] == "airplane"


def test_cifar_pickle_from_numpy1_module_path(tmp_path):
    """Real CIFAR batches name numpy.core.multiarray._reconstruct (NumPy 1); NumPy 2 moved it to numpy._core."""
    _write_fake_cifar_py(tmp_path)
    batch = _fake_cifar_batch(2, 0)
    raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    (tmp_path / "data_batch_1").write_bytes(raw)
    s = load_dataset("cifar10", tmp_path, val_fraction=0.0)
    assert len(s.train) == 26 and np.array_equal(s.train.images[0].reshape(-1).numpy(), batch[b"data"][0])


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_rejected_and_never_runs(tmp_path):
    _write_fake_cifar_py(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(DatasetError) as exc:
        load_dataset("cifar10", tmp_path)
    msg = str(exc.value)
    assert msg.startswith("refusing to unpickle") and "system" in msg and "data_batch_3" in msg and "not a CIFAR-10 batch" in msg
    assert not marker.exists()


@pytest.mark.parametrize("evil", [("builtins", "eval"), ("numpy", "load"), ("codecs", "decode")])
def test_restricted_unpickler_allows_only_array_globals(tmp_path, evil):
    module, name = evil
    raw = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x001\x85R."  # GLOBAL, arg, TUPLE1, REDUCE
    (tmp_path / "p").write_bytes(raw)
    with pytest.raises(DatasetError, match=f"refusing to unpickle {module}.{name}"):
        load_restricted_pickle(tmp_path / "p")


def test_restricted_codecs_encode_only_latin1(tmp_path):
    raw = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-7\x86R."
    (tmp_path / "p").write_bytes(raw)
    with pytest.raises(DatasetError, match="not a readable pickle"):
        load_restricted_pickle(tmp_path / "p")


def test_cifar_batch_content_is_validated(tmp_path):
    _write_fake_cifar_py(tmp_path)
    bad = _fake_cifar_batch(3, 0)
    bad[b"labels"] = [1, 2, 10]
    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump(bad, fh, protocol=2)
    with pytest.raises(DatasetError, match="outside 0..9"):
        load_dataset("cifar10", tmp_path)
    bad = _fake_cifar_batch(3, 0)
    bad[b"data"] = bad[b"data"].astype(np.float32)
    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump(bad, fh, protocol=2)
    with pytest.raises(DatasetError, match="data_batch_1 is not a CIFAR-10 batch"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x02}q\x00(")  # truncated pickle
    with pytest.raises(DatasetError, match="data_batch_1 is not a readable pickle"):
        load_dataset("cifar10", tmp_path)


def test_cifar_wrong_layout_lists_missing_files(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"")
    (tmp_path / "data_batch_2").write_bytes(b"")
    with pytest.raises(DatasetError) as exc:
        load_dataset("cifar10", tmp_path)
    msg = str(exc.value)
    assert "data_batch_3, data_batch_4, data_batch_5, test_batch" in msg and str(tmp_path) in msg
    assert "data_batch_1.bin" in msg and "cifar-10-batches-py" in msg
    assert "data_batch_1," not in msg  # present files are not listed as missing


def test_cifar_requires_root():
    with pytest.raises(DatasetError, match="--data-root pointing at the extracted `cifar-10-batches-py`"):
        load_dataset("cifar10")


def test_cifar_binary_layout_loads(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for name in [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, 5, dtype=np.uint8)
        pixels = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
        np.concatenate([labels[:, None], pixels], axis=1).tofile(tmp_path / name)
        expected[name] = (labels, pixels)
    s = load_dataset("cifar10", tmp_path, val_fraction=0.0)
    assert s.train.images.shape == (25, 3, 32, 32) and s.test.images.shape == (5, 3, 32, 32)
    assert s.test.labels.tolist() == expected["test_batch.bin"][0].tolist()
    assert np.array_equal(s.train.images[5].reshape(-1).numpy(), expected["data_batch_2.bin"][1][0])
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 3074)
    with pytest.raises(DatasetError, match="test_batch.bin .*truncated"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_loads_greyscale_pngs(tmp_path):
    root = _imagefolder(tmp_path)
    s = load_dataset("imagefolder", root, val_fraction=0.0)
    assert s.info.class_names == ("cat", "dog") and s.info.in_channels == 1 and s.info.image_size == (8, 8)
    assert s.train.images.shape == (6, 1, 8, 8) and s.test.images.shape == (4, 1, 8, 8)
    assert s.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.train.images[:, 0, 0, 0].tolist() == [40, 41, 42, 140, 141, 142]
    expected_mean = np.mean([40, 41, 42, 140, 141, 142]) / 255
    assert s.info.mean[0] == pytest.approx(expected_mean, abs=1e-5)
    assert s.info.std[0] == pytest.approx(np.std([40, 41, 42, 140, 141, 142]) / 255, abs=1e-5)


def test_imagefolder_rgb_val_folder_and_resize(tmp_path):
    root = _imagefolder(tmp_path, test_name="val", mode="RGB")
    _png(root / "train" / "cat" / "big.png", size=(16, 10), mode="L")
    s = load_dataset("imagefolder", root, image_size=(8, 8), val_fraction=0.0)
    assert s.info.in_channels == 3 and s.train.images.shape == (7, 3, 8, 8) and len(s.test) == 4
    assert len(s.info.mean) == 3


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="no train/ folder"):
        load_dataset("imagefolder", tmp_path)
    root = _imagefolder(tmp_path / "a")
    _png(root / "test" / "bird" / "0.png")
    with pytest.raises(DatasetError, match=r"only in test: \['bird'\]"):
        load_dataset("imagefolder", root)
    root = _imagefolder(tmp_path / "b")
    _png(root / "train" / "dog" / "odd.png", size=(9, 8))
    with pytest.raises(DatasetError, match="odd.png is 9×8 but most images are 8×8"):
        load_dataset("imagefolder", root)
    root = _imagefolder(tmp_path / "c")
    (root / "test" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot decode image .*broken.png"):
        load_dataset("imagefolder", root)
    root = _imagefolder(tmp_path / "d")
    (root / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty holds no"):
        load_dataset("imagefolder", root)
    (tmp_path / "e" / "train").mkdir(parents=True)
    (tmp_path / "e" / "test").mkdir()
    with pytest.raises(DatasetError, match="no class subfolders"):
        load_dataset("imagefolder", tmp_path / "e")
    with pytest.raises(DatasetError, match="needs a data folder"):
        load_dataset("imagefolder")


def test_fewer_than_two_classes_are_refused(tmp_path, toy_registry, cli_fails):
    """A one-class dataset trains to a trivial 100%: every dataset needs images of at least 2 classes."""
    root = _imagefolder(tmp_path / "one", classes=("cat",))
    with pytest.raises(DatasetError, match=r"has 1 class \(cat\): a classifier needs at least 2 classes"):
        load_dataset("imagefolder", root)
    cli_fails(["train", "--data", "imagefolder", "--data-root", str(root), "--epochs", "1", "--out", str(tmp_path / "run")],
              "has 1 class (cat)", "at least 2 classes")
    assert not (tmp_path / "run").exists()
    with pytest.raises(DatasetError, match="use num_classes >= 2"):
        load_dataset("synthetic", num_classes=1)

    def one_label(root, n: int = 40):
        data = _indexed_dataset(n)
        return ArrayDataset(data.images, torch.full_like(data.labels, 2), data.info), data

    register_dataset("one-label", one_label)
    with pytest.raises(DatasetError, match="holds images of 1 of its 3 classes"):
        load_dataset("one-label")


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_seeded():
    a = load_dataset("synthetic", num_train=200, num_test=50, data_seed=1)
    b = load_dataset("synthetic", num_train=200, num_test=50, data_seed=1)
    c = load_dataset("synthetic", num_train=200, num_test=50, data_seed=2)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape == (180, 1, 28, 28)
    assert a.info == b.info and a.info.mean != c.info.mean


def test_synthetic_options_and_balance():
    s = load_dataset("synthetic", num_train=120, num_test=30, num_classes=3, in_channels=3, image_size=(16, 12), val_fraction=0.0)
    assert s.train.images.shape == (120, 3, 16, 12) and s.info.num_classes == 3 and len(s.info.std) == 3
    assert s.train.class_counts().tolist() == [40, 40, 40]
    with pytest.raises(ConfigError, match="does not take option"):
        load_dataset("synthetic", colour="blue")


@pytest.fixture
def one_thread():
    """Single-threaded torch: on a busy 2-core machine two OpenMP threads are many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_synthetic_is_learnable(one_thread):
    torch.manual_seed(0)
    s = load_dataset("synthetic", num_train=1000, num_test=500, val_fraction=0.0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(), torch.nn.Linear(256, 10),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    loader = BatchLoader(s.train, 32, shuffle=True)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in BatchLoader(s.test, 250))
    assert correct / len(s.test) > 0.9  # measured 0.97-0.99 across data seeds


# ---------------------------------------------------------------- load_dataset


def test_list_and_unknown_dataset():
    assert list_datasets() == ["cifar10", "fashion-mnist", "imagefolder", "synthetic"]
    with pytest.raises(DatasetError, match="unknown dataset 'mnist': choose one of cifar10, fashion-mnist, imagefolder, synthetic"):
        load_dataset("mnist")


def test_split_partition_and_determinism(toy_registry):
    a = load_dataset(toy_registry, val_fraction=0.2, seed=5)
    b = load_dataset(toy_registry, val_fraction=0.2, seed=5)
    c = load_dataset(toy_registry, val_fraction=0.2, seed=6)
    def ids(ds):
        return ds.images[:, 0, 0, 0].to(torch.int64) + 256 * ds.images[:, 0, 0, 1].to(torch.int64)

    train_ids, val_ids = set(ids(a.train).tolist()), set(ids(a.val).tolist())
    assert len(val_ids) == 60 and len(train_ids) == 240 and not train_ids & val_ids and train_ids | val_ids == set(range(300))
    assert a.val.class_counts().tolist() == [20, 20, 20]
    assert torch.equal(a.val.images, b.val.images) and not torch.equal(a.val.images, c.val.images)
    assert set(ids(a.test).tolist()) == set(range(60))
    assert len(load_dataset(toy_registry, val_fraction=0.0).val) == 0


def test_subsets_are_balanced_and_taken_before_val(toy_registry):
    s = load_dataset(toy_registry, val_fraction=0.25, train_subset=60, test_subset=30, seed=1)
    assert len(s.train) + len(s.val) == 60 and len(s.val) == 15 and len(s.test) == 30
    assert (s.train.class_counts() + s.val.class_counts()).tolist() == [20, 20, 20]
    assert s.test.class_counts().tolist() == [10, 10, 10]
    assert len(load_dataset(toy_registry, train_subset=10_000, val_fraction=0.0).train) == 300
    with pytest.raises(ConfigError, match="val_fraction"):
        load_dataset(toy_registry, val_fraction=1.0)


# ---------------------------------------------------------------- Augment


def test_crop_identity_at_center_offset_and_shift_at_corner():
    x = torch.rand(3, 2, 6, 5)
    p = 2
    center = torch.full((3,), p)
    assert torch.equal(crop_with_padding(x, p, center, center), x)
    zero = torch.zeros(3, dtype=torch.int64)
    out = crop_with_padding(x, p, zero, zero)  # window starts in the padding: image moves down-right
    assert torch.equal(out[..., p:, p:], x[..., :-p, :-p])
    assert out[..., :p, :].abs().sum() == 0 and out[..., :, :p].abs().sum() == 0
    mixed = crop_with_padding(x, p, torch.tensor([2, 0, 4]), torch.tensor([2, 2, 2]))
    assert torch.equal(mixed[0], x[0]) and torch.equal(mixed[2, :, :-2], x[2, :, 2:])


def test_augment_shapes_determinism_and_flip():
    x = torch.rand(64, 3, 8, 8)
    aug = Augment(crop_padding=2, hflip=True)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    flip = Augment(hflip=True)(x, torch.Generator().manual_seed(3))
    same = [torch.equal(flip[i], x[i]) for i in range(64)]
    flipped = [torch.equal(flip[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or f for s, f in zip(same, flipped)) and 10 < sum(flipped) < 54
    assert torch.equal(Augment()(x, torch.Generator()), x)


def test_default_augment():
    assert default_augment("fashion-mnist") == Augment(2, True)
    assert default_augment("cifar10") == Augment(4, True)
    assert default_augment("synthetic").is_identity and default_augment("imagefolder").is_identity


# ---------------------------------------------------------------- BatchLoader


def test_loader_normalises_constant_image():
    info = _info(2, 3, (4, 4), (0.1, 0.2, 0.3), (0.5, 0.25, 0.125))
    ds = ArrayDataset(torch.full((2, 3, 4, 4), 51, dtype=torch.uint8), torch.tensor([0, 1]), info)
    x, y = next(iter(BatchLoader(ds, 2)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.tolist() == [0, 1]
    for c, (m, s) in enumerate(zip(info.mean, info.std)):
        assert torch.allclose(x[:, c], torch.full((2, 4, 4), (0.2 - m) / s))


def test_loader_no_shuffle_order_and_lengths():
    ds = _indexed_dataset(10)
    loader = BatchLoader(ds, 4)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    assert sum((_indices_of(x, ds.info) for x, _ in batches), []) == list(range(10))
    assert len(BatchLoader(ds, 4, drop_last=True)) == 2 and len(list(BatchLoader(ds, 4, drop_last=True))) == 2
    assert len(BatchLoader(ds.subset(torch.zeros(0, dtype=torch.int64)), 4)) == 0


def test_loader_is_deterministic_per_seed_and_epoch():
    ds = _indexed_dataset(50)
    def make():
        return BatchLoader(ds, 8, shuffle=True, augment=Augment(crop_padding=1, hflip=True), seed=7)

    loader = make()
    loader.set_epoch(3)
    first = list(loader)
    torch.manual_seed(123)  # global RNG state must not matter
    again = list(loader)
    other = make()
    other.set_epoch(3)
    fresh = list(other)
    for (x1, y1), (x2, y2), (x3, y3) in zip(first, again, fresh):
        assert torch.equal(x1, x2) and torch.equal(x1, x3) and torch.equal(y1, y2) and torch.equal(y1, y3)
    loader.set_epoch(4)
    assert not torch.equal(loader.indices(), other.indices())
    plain = BatchLoader(ds, 50, shuffle=True, seed=7)
    order = _indices_of(next(iter(plain))[0], ds.info)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert order == plain.indices().tolist()


def test_loader_ddp_shards():
    ds = _indexed_dataset(11)
    shards = [BatchLoader(ds, 4, shuffle=True, seed=2, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_epoch(1)
    assert [s.num_samples for s in shards] == [6, 6] and [len(s) for s in shards] == [2, 2]
    seen = [sum((_indices_of(x, ds.info) for x, _ in s), []) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 6
    assert set(seen[0]) | set(seen[1]) == set(range(11))
    assert len(set(seen[0]) & set(seen[1])) == 1  # exactly the one wrapped-around pad sample
    single = BatchLoader(ds, 4, shuffle=True, seed=2)
    single.set_epoch(1)
    perm = single.indices().tolist()
    assert seen[0] == perm[0::2] and seen[1] == perm[1::2] + perm[:1]
    with pytest.raises(ConfigError, match="rank"):
        BatchLoader(ds, 4, rank=2, world_size=2)


def test_loader_channels_last():
    ds = ArrayDataset(torch.zeros(4, 3, 5, 5, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), _info(1, 3, (5, 5)))
    x, _ = next(iter(BatchLoader(ds, 4, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)
