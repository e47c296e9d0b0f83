"""bench.distill_table on a tiny teacher run: every variant trains a student of the asked width,
the untrained SVD variant keeps its epoch count at 1, and finished runs are reused."""
from __future__ import annotations

import torch

from train.config import TrainConfig
from train.stage1 import run_stage1
from train.synthetic import generate

from bench import distill_table as bench
from train.run import read_metrics


def test_table_over_all_variants(tmp_path, capsys):
    data = generate(tmp_path / "data", n_users=60, n_items=50, seed=0)
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)},
        "backbone": {"name": "lightgcn", "embedding_size": 16},
        "optim": {"batch_size": 256, "epochs": 3}, "eval": {"ks": [10, 20]}})
    teacher = run_stage1(cfg, tmp_path / "teachers" / "lightgcn" / "0", torch.device("cpu"))
    args = ["--teachers", "lightgcn", "--seeds", "0", "--dims", "4", "--epochs", "2",
            "--teacher-root", str(tmp_path / "teachers"), "--out", str(tmp_path / "out")]
    assert bench.main(args) == 0
    table = capsys.readouterr().out
    assert f"| lightgcn | lightgcn 16-d | teacher | 64 | {teacher['test']['recall@20']:.4f}" in table
    for variant in bench.VARIANTS:
        metrics = read_metrics(tmp_path / "out" / "lightgcn" / f"{variant}-lightgcn4" / "0"
                               ).model_dump()
        assert metrics["distill"]["student_dim"] == 4
        assert metrics["epochs_run"] == (1 if variant == "svd" else 2)
        assert f"| lightgcn | lightgcn 4-d | {variant} | 16 |" in table
        used = metrics["distill"]["config"]
        assert ("svd_relative_error" in metrics["distill"]) == (used["init"] == "svd")
        assert (used["pair_weight"] > 0) == variant.startswith("kd")
    # finished runs are reused: the table is printed again without training
    assert bench.main(args) == 0
    assert capsys.readouterr().out.strip() == table.strip()


def test_kd_overrides_reach_the_kd_variants_only():
    from train.config import TrainConfig

    teacher = TrainConfig.model_validate({"data": {"path": "x"}, "backbone": {"name": "bpr"}})
    args = bench.parse_args(["--kd-set", "list_weight=0", "--kd-set", "temperature=4"])
    kd = bench.distill_config("kd", 32, teacher, args)
    assert kd.list_weight == 0 and kd.temperature == 4 and kd.pair_weight == 0.1
    assert bench.distill_config("svd_bpr", 32, teacher, args).temperature == 1
    assert bench.run_name("kd", 32, args) == "kd-lightgcn32-list_weight=0-temperature=4"
    assert bench.run_name("scratch", 32, args) == "scratch-lightgcn32"
    svd = bench.distill_config("svd", 16, teacher, args)
    assert svd.optim.learning_rate == 0 and svd.optim.epochs == 1
