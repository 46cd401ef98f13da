import numpy as np
import pytest
import torch
from PIL import Image

from priorlab.data import DigitsDataModule, HFDataModule, MNISTDataModule
from priorlab.errors import UserError


@pytest.mark.parametrize("size", [16, 32])
def test_mnist_is_bundled_resized_and_scaled(size):
    dm = MNISTDataModule(image_size=size, val_fraction=0.1)
    dm.setup()
    x, y = dm.train_set.tensors
    assert dm.sample_shape == (1, size, size) and dm.num_classes == 10
    assert len(dm.train_set) + len(dm.val_set) == 5000 and len(dm.val_set) == 500
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6 and x.min() < -0.99 and x.max() > 0.5
    assert set(y.tolist()) == set(range(10))


def test_mnist_split_is_deterministic_and_class_subset_works():
    a, b = MNISTDataModule(split_seed=3), MNISTDataModule(split_seed=3)
    a.setup(), b.setup()
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    sub = MNISTDataModule(classes=[1, 7])
    sub.setup()
    assert set(sub.train_set.tensors[1].tolist()) == {1, 7} and len(sub.train_set) + len(sub.val_set) == 1000
    with pytest.raises(UserError, match="selects no sample"):
        MNISTDataModule(classes=[42]).setup()


def test_digits():
    dm = DigitsDataModule()
    dm.setup()
    assert dm.sample_shape == (1, 8, 8) and len(dm.train_set) + len(dm.val_set) == 1797


def _imagefolder(root, n_per_class=3, classes=("cat", "dog"), size=10):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_hf_local_imagefolder(tmp_path):
    dm = HFDataModule(source=str(_imagefolder(tmp_path / "imgs")), image_size=8, channels=3, val_fraction=0.2)
    dm.setup()
    assert dm.sample_shape == (3, 8, 8) and dm.num_classes == 2
    assert len(dm.train_set) + len(dm.val_set) == 6


def test_hf_local_parquet_with_custom_columns(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)) for _ in range(10)]
    ds = datasets.Dataset.from_dict({"img": images, "digit": [i % 4 for i in range(10)]})
    ds = ds.cast_column("img", datasets.Image())
    ds.to_parquet(str(tmp_path / "train.parquet"))
    dm = HFDataModule(
        source=str(tmp_path / "train.parquet"),
        image_column="img",
        label_column="digit",
        image_size=16,
        channels=1,
        val_fraction=0.2,
    )
    dm.setup()
    assert dm.sample_shape == (1, 16, 16) and dm.num_classes == 4
    with pytest.raises(UserError, match=r"data.label_column='label' is not a column .*\['img', 'digit'\]"):
        HFDataModule(source=str(tmp_path / "train.parquet"), image_column="img").setup()
    with pytest.raises(UserError, match="label 3 is outside \\[0, 3\\)"):
        HFDataModule(
            source=str(tmp_path / "train.parquet"), image_column="img", label_column="digit", num_classes=3
        ).setup()


def test_hf_missing_path_is_named(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        HFDataModule(source=str(tmp_path / "nowhere")).setup()


def test_hf_empty_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="data.source=.*empty"):
        HFDataModule(source=str(tmp_path / "empty")).setup()


def test_train_per_class_keeps_the_first_n_of_each_class_and_evaluation_keeps_all():
    full, five, twenty = (MNISTDataModule(train_per_class=n) for n in ("all", 5, 20))
    for dm in (full, five, twenty):
        dm.setup()
    y5, y20 = five.train_set.tensors[1], twenty.train_set.tensors[1]
    assert torch.bincount(y5).tolist() == [5] * 10 and torch.bincount(y20).tolist() == [20] * 10
    # nested: the 5 of each class are the first 5 of the 20, and both come from the full training split
    x5, x20, xall = five.train_set.tensors[0], twenty.train_set.tensors[0], full.train_set.tensors[0]
    for k in range(10):
        assert torch.equal(x5[y5 == k], x20[y20 == k][:5])
        assert torch.equal(x20[y20 == k], xall[full.train_set.tensors[1] == k][:20])
    # the validation split, the whole training split (the evaluator's) and the data's identity are unchanged
    assert torch.equal(five.val_set.tensors[0], full.val_set.tensors[0])
    assert torch.equal(five.full_train_set.tensors[0], xall) and torch.equal(five.all_data()[0], full.all_data()[0])
    assert five.identity() == full.identity() and five.name == full.name
    for bad in (0, -3, 2.5, "some", True):
        with pytest.raises(UserError, match="train_per_class"):
            MNISTDataModule(train_per_class=bad)
