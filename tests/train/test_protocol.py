"""Early-stopping protocols: MMRec's exact rule and the patient one."""
from __future__ import annotations

import torch

from train.config import EvalConfig, TrainConfig
from train.run import read_metrics
from train.stage1 import run_stage1
from train.synthetic import generate


def test_mmrec_rule_is_plain_patience():
    cfg = EvalConfig(patience=20)
    assert not cfg.stops(epoch=30, best_epoch=9, bad_evals=20)
    assert cfg.stops(epoch=30, best_epoch=9, bad_evals=21)
    assert cfg.stops(epoch=500, best_epoch=400, bad_evals=21)


def test_patient_rule_waits_for_min_epochs_and_grows_with_the_best_epoch():
    cfg = EvalConfig(patience=20, protocol="patient", min_epochs=50, patience_ratio=0.5)
    assert not cfg.stops(epoch=40, best_epoch=5, bad_evals=34)      # before min_epochs
    assert cfg.stops(epoch=50, best_epoch=5, bad_evals=44)
    assert not cfg.stops(epoch=500, best_epoch=400, bad_evals=150)  # patience 200 at epoch 400
    assert cfg.stops(epoch=601, best_epoch=400, bad_evals=201)


def test_patient_protocol_trains_at_least_min_epochs(tmp_path):
    data = generate(tmp_path / "data", n_users=40, n_items=30, seed=0)

    def run(protocol: str):
        cfg = TrainConfig.model_validate({
            "seed": 0, "data": {"path": str(data)}, "backbone": {"name": "bpr", "embedding_size": 8},
            "optim": {"batch_size": 64, "epochs": 12},
            "eval": {"ks": [20], "patience": 0, "protocol": protocol, "min_epochs": 8}})
        run_stage1(cfg, tmp_path / protocol, torch.device("cpu"))
        return read_metrics(tmp_path / protocol)

    mmrec, patient = run("mmrec"), run("patient")
    assert patient.epochs_run >= 8 and mmrec.epochs_run <= patient.epochs_run
    # the first epochs are the same training either way, so the patient run's best validation
    # is the best over a superset of the same epochs
    assert patient.valid["recall@20"] >= mmrec.valid["recall@20"]
