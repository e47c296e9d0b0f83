"""The next training dataset from a base dataset plus the event store."""
from __future__ import annotations

import json

import numpy as np
import pytest

from index import events as ev
from index.events import StoreError, open_store
from index.events.dataset import MARKER, dataset_watermark, write_training_dataset
from tests.conftest import write_inter
from bench.bundle_factory import png
from train.data import load_dataset


@pytest.fixture
def base(tmp_path):
    """A 4-user, 6-item dataset with items.tsv and two images."""
    d = tmp_path / "base"
    d.mkdir()
    rows = [(u, i, 0) for u in range(4) for i in range(4)] + [(0, 5, 1), (1, 4, 2)]
    write_inter(d / "base.inter", rows, header="userID\titemID\tx_label")
    (d / "images").mkdir()
    for i in (0, 1):
        (d / "images" / f"{i}.png").write_bytes(png((10 * i, 0, 0)))
    lines = ["itemID\ttext\timage"] + [f"{i}\titem {i}\t" + (f"images/{i}.png" if i < 2 else "")
                                       for i in range(6)]
    (d / "items.tsv").write_text("\n".join(lines) + "\n")
    return d


def test_online_items_and_feedback_become_training_data(base, tmp_path):
    store = open_store(tmp_path / "state")
    store.append(ev.upsert(10, png((0, 200, 0)), "new\tgreen\nlamp"))
    store.append(ev.upsert(1, b"", "item 1, new text"))
    store.append(ev.delete(3))
    store.append(ev.interactions(2, [10, 0, 4], [50, 51, 52]))  # (2, 0) is in the base
    store.append(ev.interactions(7, [10, 1], [60, 61]))          # a new user
    store.append(ev.interactions(0, [3], [70]))                   # after item 3's delete
    summary = write_training_dataset(store, base, tmp_path / "next")
    out = tmp_path / "next"
    assert summary.watermark == 6 and dataset_watermark(out) == 6
    assert json.loads((out / MARKER).read_text())["base_watermark"] == 0
    ds = load_dataset(out)
    pairs = {(int(u), int(i)) for u, i in ds.train}
    assert {(2, 10), (7, 10), (7, 1)} <= pairs  # first rows of a new item or user are train
    assert ds.items.texts[10] == "new green lamp" and ds.items.images[10].is_file()
    assert ds.items.texts[1] == "item 1, new text" and ds.items.images[1] is None
    assert ds.items.texts[3] == ""  # deleted: gone from items.tsv
    deleted_rows = [p for p in ds.train.tolist() if p[1] == 3]
    assert deleted_rows == [[0, 3]]  # base rows of item 3 dropped; the later online row stays
    assert summary.duplicates == 1 and summary.rows_added == 5
    assert (out / "images" / "0.png").is_file() and not (out / "image_feat.npy").exists()


def test_datasets_chain_on_their_watermark(base, tmp_path):
    store = open_store(tmp_path / "state")
    store.append(ev.interactions(0, [4], [1]))
    first = write_training_dataset(store, base, tmp_path / "d1")
    store.append(ev.interactions(1, [5], [2]))
    second = write_training_dataset(store, tmp_path / "d1", tmp_path / "d2")
    assert (first.watermark, second.base_watermark, second.watermark) == (1, 1, 2)
    assert second.rows_added == 1  # event 1 is not applied twice
    with pytest.raises(FileExistsError):
        write_training_dataset(store, base, tmp_path / "d2")


def test_compacted_store_needs_a_base_that_covers_it(base, tmp_path):
    store = open_store(tmp_path / "state")
    store.append(ev.interactions(0, [4], [1]))
    write_training_dataset(store, base, tmp_path / "d1")
    store.compact(1, np.array([], dtype=np.int64))
    with pytest.raises(StoreError, match="compacted through event 1"):
        write_training_dataset(store, base, tmp_path / "d2")
    store.set_meta("base_dataset", str(tmp_path / "d1"))
    assert write_training_dataset(store, base, tmp_path / "d3").base == str(tmp_path / "d1")
