"""Dataset loading and validation: every malformed input names the file, line and problem."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_inter
from train.data import DatasetError, load_dataset, to_csr


def test_loads_splits_and_sizes(tmp_path):
    write_inter(tmp_path / "d.inter", [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 3, 0), (1, 0, 2)])
    ds = load_dataset(tmp_path)
    assert (ds.n_users, ds.n_items) == (2, 4)
    assert ds.train.tolist() == [[0, 0], [1, 3]]
    assert ds.valid.tolist() == [[0, 1]] and ds.test.tolist() == [[0, 2], [1, 0]]
    assert ds.train_items.tolist() == [0, 3]


def test_optional_columns_allowed(tmp_path):
    (tmp_path / "d.inter").write_text("userID\titemID\trating\ttimestamp\tx_label\n0\t0\t5\t9\t0\n")
    assert load_dataset(tmp_path).n_items == 1


@pytest.mark.parametrize("content, message", [
    ("", ":1: missing header"),
    ("userID\titemID\n0\t1\n", ":1: header lacks column(s) x_label"),
    ("userID\titemID\tx_label\n0\tabc\t0\n", ":2: itemID is not an integer: 'abc'"),
    ("userID\titemID\tx_label\n0\t1\t0\n1\t1\t3\n", ":3: x_label must be 0, 1 or 2, got 3"),
    ("userID\titemID\tx_label\n-1\t1\t0\n", ":2: userID is negative"),
    ("userID\titemID\tx_label\n0\t1\n", ":2: expected 3 tab-separated fields, got 2"),
    ("userID\titemID\tx_label\n0\t1\t0\n2\t2\t0\n0\t1\t2\n",
     ":4: duplicate interaction user 0 item 1 (first seen on line 2)"),
])
def test_inter_errors_name_file_and_line(tmp_path, content, message):
    (tmp_path / "d.inter").write_text(content)
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    assert str(tmp_path / "d.inter") in str(err.value)
    assert message in str(err.value)


def test_cold_users_dropped_with_count(tmp_path, caplog):
    write_inter(tmp_path / "d.inter", [(0, 0, 0), (0, 1, 2), (1, 1, 1), (1, 2, 2), (2, 0, 2)])
    ds = load_dataset(tmp_path)
    assert ds.dropped_rows == 3
    assert ds.valid.size == 0 and ds.test.tolist() == [[0, 1]]
    assert "dropped 3 valid/test rows" in caplog.text


def test_no_inter_file(tmp_path):
    with pytest.raises(DatasetError, match="exactly one"):
        load_dataset(tmp_path)


def _with_items(tmp_path, items_tsv: str):
    write_inter(tmp_path / "d.inter", [(0, 0, 0), (0, 1, 0)])
    (tmp_path / "items.tsv").write_text(items_tsv)


def test_items_table_and_missing_content(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "img" / "a.png")
    _with_items(tmp_path, "itemID\ttext\timage\n0\ta red mug\timg/a.png\n1\t\t\n2\tcold item\t\n")
    ds = load_dataset(tmp_path)
    assert ds.n_items == 3                       # item 2 is only in items.tsv (cold)
    assert ds.items.texts == ["a red mug", "", "cold item"]
    assert ds.items.images[0] == (tmp_path / "img" / "a.png").resolve()
    assert ds.items.missing_text == 1 and ds.items.missing_image == 2


@pytest.mark.parametrize("row, message", [
    ("0\tx\tnope.png", ":2: image file 'nope.png' does not exist"),
    ("0\tx\t../outside.png", ":2: image path '../outside.png' escapes the dataset directory"),
    ("0\tx\t/etc/passwd", "escapes the dataset directory"),
    ("zero\tx\t", ":2: itemID is not an integer"),
    ("0\tx\t\n0\ty\t", ":3: duplicate itemID 0"),
])
def test_items_errors(tmp_path, row, message):
    (tmp_path.parent / "outside.png").write_bytes(b"x")
    _with_items(tmp_path, "itemID\ttext\timage\n" + row + "\n")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    assert "items.tsv" in str(err.value) and message in str(err.value)


def test_items_header_required(tmp_path):
    _with_items(tmp_path, "itemID\ttext\n0\tx\n")
    with pytest.raises(DatasetError, match=r"items.tsv:1: header lacks column\(s\) image"):
        load_dataset(tmp_path)


def test_precomputed_features_shape_checked(tmp_path):
    write_inter(tmp_path / "d.inter", [(0, 0, 0), (0, 1, 0)])
    np.save(tmp_path / "text_feat.npy", np.ones((2, 3), dtype=np.float32))
    assert load_dataset(tmp_path).features["text"].shape == (2, 3)
    np.save(tmp_path / "image_feat.npy", np.ones((5, 3), dtype=np.float32))
    with pytest.raises(DatasetError, match="expected shape"):
        load_dataset(tmp_path)


def test_to_csr_sorted_rows():
    indptr, idx = to_csr(np.array([[1, 5], [0, 3], [1, 2], [0, 1]]), 3)
    assert indptr.tolist() == [0, 2, 4, 4] and idx.tolist() == [1, 3, 2, 5]
