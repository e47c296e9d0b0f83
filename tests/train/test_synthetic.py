"""Tests for the synthetic catalogue: determinism, file format, and that content predicts clicks."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import load_dataset
from train.evaluate import evaluate_scores
from train.synthetic import generate, main, split_labels

log = logging.getLogger(__name__)


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a tab-separated file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A small dataset (40 users, 30 items, 32 px images)."""
    return generate(tmp_path_factory.mktemp("small"), 40, 30, seed=3, image_size=32,
                    missing_text=0.05, missing_image=0.05)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """A moderately sized dataset for the content-versus-popularity check."""
    return generate(tmp_path_factory.mktemp("medium"), 600, 300, seed=0)


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    again = generate(tmp_path / "a", 40, 30, seed=3, image_size=32, missing_text=0.05,
                     missing_image=0.05)
    other = generate(tmp_path / "b", 40, 30, seed=4, image_size=32, missing_text=0.05,
                     missing_image=0.05)
    first = _digests(small)
    assert first == _digests(again)
    second = _digests(other)
    assert first["synthetic.inter"] != second["synthetic.inter"]
    assert first["items.tsv"] != second["items.tsv"]


def test_split_labels_follow_mmrec_rule():
    assert split_labels(5).tolist() == [0, 0, 0, 1, 2]
    assert split_labels(9).tolist() == [0] * 7 + [1, 2]
    assert np.bincount(split_labels(10)).tolist() == [8, 1, 1]
    assert np.bincount(split_labels(25)).tolist() == [20, 2, 3]
    assert np.bincount(split_labels(31)).tolist() == [25, 3, 3]


def test_inter_file_format(small):
    header, rows = _read_tsv(small / "synthetic.inter")
    assert header == ["userID", "itemID", "rating", "timestamp", "x_label"]
    arr = np.asarray(rows, dtype=np.int64)
    assert sorted(set(arr[:, 0].tolist())) == list(range(40))
    assert arr[:, 1].min() >= 0 and arr[:, 1].max() < 30
    assert len({(u, i) for u, i in arr[:, :2].tolist()}) == len(arr)
    assert set(arr[:, 2].tolist()) <= {1, 2, 3, 4, 5}
    for u in range(40):
        labels = arr[arr[:, 0] == u, 4]
        assert len(labels) >= 5
        assert np.bincount(labels, minlength=3).tolist() == \
            np.bincount(split_labels(len(labels)), minlength=3).tolist()


def test_items_and_images(small):
    header, rows = _read_tsv(small / "items.tsv")
    assert header == ["itemID", "text", "image"]
    assert [int(r[0]) for r in rows] == list(range(30))
    assert all(len(r) == 3 for r in rows)
    no_text = [r for r in rows if r[1] == ""]
    no_image = [r for r in rows if r[2] == ""]
    assert len(no_text) == 2 and len(no_image) == 2
    for item, text, image in rows:
        if text:
            assert "\n" not in text and len(text.split()) >= 4
        if image:
            assert image == f"images/{item}.png"
            with Image.open(small / image) as img:
                assert img.format == "PNG" and img.size == (32, 32) and img.mode == "RGB"
                assert len(img.getcolors(4096) or range(4097)) > 5
    assert len(list((small / "images").glob("*.png"))) == 28
    a_header, attrs = _read_tsv(small / "attributes.tsv")
    assert a_header == ["itemID", "category", "colour", "pattern", "style"]
    assert len(attrs) == 30


def test_loads_with_project_loader(small):
    ds = load_dataset(small)
    assert (ds.n_users, ds.n_items) == (40, 30)
    assert len(ds.test) >= len(ds.valid) >= 40
    assert len(ds.train) + len(ds.valid) + len(ds.test) == len(_read_tsv(small / "synthetic.inter")[1])
    assert ds.items is not None
    assert ds.items.missing_text == 2 and ds.items.missing_image == 2


def test_split_proportions_near_8_1_1(medium):
    _, rows = _read_tsv(medium / "synthetic.inter")
    share = np.bincount(np.asarray(rows, dtype=np.int64)[:, 4], minlength=3) / len(rows)
    assert 0.76 < share[0] < 0.84 and 0.07 < share[1] < 0.11 and 0.08 < share[2] < 0.12
    per_user = np.bincount(np.asarray(rows, dtype=np.int64)[:, 0])
    assert per_user.min() >= 5 and 15 < per_user.mean() < 25


def test_bad_arguments_raise_clear_errors(tmp_path, small):
    with pytest.raises(ValueError, match="at least 10 items"):
        generate(tmp_path / "x", 5, 9, seed=0)
    with pytest.raises(ValueError, match="at least 2 users"):
        generate(tmp_path / "x", 1, 20, seed=0)
    with pytest.raises(FileExistsError):
        generate(small, 40, 30, seed=3)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "y"), "--users", "3", "--items", "4"])


def test_cli_writes_dataset(tmp_path):
    main(["--out", str(tmp_path / "cli"), "--users", "5", "--items", "12", "--seed", "1",
          "--image-size", "24"])
    assert (tmp_path / "cli" / "synthetic.inter").is_file()
    with Image.open(tmp_path / "cli" / "images" / "0.png") as img:
        assert img.size == (24, 24)


def _attribute_onehots(path: Path) -> np.ndarray:
    """One-hot item vectors over every (attribute, value) pair of attributes.tsv, (I, F)."""
    _, rows = _read_tsv(path / "attributes.tsv")
    vocab = sorted({(col, value) for r in rows for col, value in enumerate(r[1:])})
    index = {key: j for j, key in enumerate(vocab)}
    out = np.zeros((len(rows), len(vocab)), dtype=np.float32)
    for r in rows:
        for col, value in enumerate(r[1:]):
            out[int(r[0]), index[(col, value)]] = 1.0
    return out


def test_content_knn_beats_popularity(medium):
    ds = load_dataset(medium)
    counts = np.bincount(ds.train[:, 1], minlength=ds.n_items).astype(np.float32)
    pop = torch.from_numpy(counts)                                       # (I,)
    item_vecs = torch.from_numpy(_attribute_onehots(medium))             # (I, F)
    profiles = torch.zeros(ds.n_users, item_vecs.shape[1])               # (U, F)
    profiles.index_add_(0, torch.from_numpy(ds.train[:, 0]), item_vecs[ds.train[:, 1]])
    profiles /= torch.bincount(torch.from_numpy(ds.train[:, 0]), minlength=ds.n_users)[:, None]
    tie_break = 1e-3 * pop / pop.max()
    noise = torch.rand(ds.n_users, ds.n_items, generator=torch.Generator().manual_seed(0))

    rand_metrics = evaluate_scores(lambda u: noise[u], ds, "test")
    pop_metrics = evaluate_scores(lambda u: pop.repeat(len(u), 1), ds, "test")
    knn_metrics = evaluate_scores(lambda u: profiles[u] @ item_vecs.T + tie_break, ds, "test")
    log.warning("recall@20: content kNN %.4f, popularity %.4f, random %.4f",
                knn_metrics["recall@20"], pop_metrics["recall@20"], rand_metrics["recall@20"])
    assert pop_metrics["recall@20"] > 2.0 * rand_metrics["recall@20"]
    assert knn_metrics["recall@20"] > 1.3 * pop_metrics["recall@20"]
