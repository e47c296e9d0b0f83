"""bench.index_scale end to end on a tiny catalogue: exact truth, every row, shards."""
from __future__ import annotations

import numpy as np

from bench import index_scale


def test_table_on_tiny_catalogue(capsys):
    index_scale.main(["--n", "3000", "--dim", "16", "--queries", "20", "--centres", "30",
                      "--build-threads", "1", "--nprobe", "4", "--k-factor", "8", "--shards", "2",
                      "--factories", "IVF{nlist},SQ8", "IVF{nlist},PQ4x4,Refine(SQ8)"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 3,000 |")]
    names = [ln.split(" | ")[1] for ln in lines]
    assert names == ["Flat", "IVF64,SQ8", "IVF64,PQ4x4,Refine(SQ8)",
                     "2 x IVF64,SQ8 (serial IndexShards)", "2 x IVF64,SQ8 (threaded IndexShards)"]
    recalls = [float(ln.split(" | ")[7]) for ln in lines]
    assert recalls[0] == 1.0 and all(0.3 < r <= 1.0 for r in recalls[1:])
    file_bytes = [float(ln.split(" | ")[3]) for ln in lines]
    assert file_bytes[0] > 16 * 4 and file_bytes[1] < file_bytes[0]  # SQ8: 1 byte per dimension
    assert abs(file_bytes[3] - file_bytes[1]) < 0.2 * file_bytes[1]  # shards: same bytes per item


def test_exact_topk_matches_numpy():
    args = index_scale.parse_args(["--dim", "8", "--centres", "5"])
    x = index_scale.clustered(500, args, seed=1)
    q = index_scale.clustered(7, args, seed=2)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    want = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :5]
    got = index_scale.exact_topk(x, q, 5, threads=1)
    assert (np.sort(got, 1) == np.sort(want, 1)).mean() > 0.99  # ties may swap
