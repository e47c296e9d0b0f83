"""bench.sparse_data: a sparse copy keeps N training rows per user and every other row."""
from __future__ import annotations

from train.data import load_dataset

from bench import sparse_data


def _write_dataset(root, rows):
    root.mkdir()
    lines = ["userID\titemID\trating\ttimestamp\tx_label\n"]
    lines += [f"{u}\t{i}\t5\t{n}\t{x}\n" for n, (u, i, x) in enumerate(rows)]
    (root / f"{root.name}.inter").write_text("".join(lines))
    (root / "items.tsv").write_text("itemID\ttext\n" + "".join(f"{i}\titem {i}\n"
                                                            for i in range(12)))


def test_sparse_copy_cuts_training_rows_per_user_only(tmp_path):
    rows = [(0, i, 0) for i in range(10)] + [(0, 10, 1), (0, 11, 2)]
    rows += [(1, i, 0) for i in range(2)] + [(1, 5, 1), (1, 6, 2)]
    src = tmp_path / "src"
    _write_dataset(src, rows)
    out = tmp_path / "sparse3"
    assert sparse_data.main(["--src", str(src), "--per-user", "3", "--out", str(out)]) == 0
    ds = load_dataset(out, load_items=False)
    assert (out / "items.tsv").read_text() == (src / "items.tsv").read_text()
    lines = [line.split("\t") for line in (out / "sparse3.inter").read_text().splitlines()[1:]]
    train = [(int(u), int(i)) for u, i, _, _, x in lines if x == "0"]
    held = sorted((int(u), int(i), int(x)) for u, i, _, _, x in lines if x != "0")
    assert held == [(0, 10, 1), (0, 11, 2), (1, 5, 1), (1, 6, 2)]  # evaluation rows kept whole
    assert sorted(u for u, _ in train) == [0, 0, 0, 1, 1]  # user 1 had only 2: both kept
    assert len({i for u, i in train if u == 0}) == 3
    assert ds.n_users == 2
    # seeded: the same seed draws the same rows, another seed (very likely) others
    again = tmp_path / "again"
    sparse_data.main(["--src", str(src), "--per-user", "3", "--out", str(again)])
    assert (again / "again.inter").read_text() == (out / "sparse3.inter").read_text()
    draws = set()
    for seed in range(5):
        kept, _ = sparse_data.sparse_rows((src / "src.inter").read_text().splitlines(True), 3, seed)
        draws.add(tuple(kept))
    assert len(draws) > 1
