"""Early-stopping protocols: MMRec's exact rule and the patient one."""
from __future__ import annotations

import pytest
import torch

from train.config import EvalConfig, TrainConfig
from train.fit import replay_stopping
from train.run import read_metrics
from train.stage1 import run_stage1
from train.synthetic import generate


def test_default_rule_is_patient_with_patience_30_after_50_epochs():
    cfg = EvalConfig()
    assert cfg.protocol == "patient"
    assert not cfg.stops(epoch=49, best_epoch=5, bad_evals=44)     # before min_epochs
    assert not cfg.stops(epoch=60, best_epoch=29, bad_evals=30)
    assert cfg.stops(epoch=60, best_epoch=28, bad_evals=31)
    assert cfg.stops(epoch=900, best_epoch=800, bad_evals=31)       # no growth by default


def test_mmrec_rule_is_plain_patience():
    cfg = EvalConfig(patience=20, protocol="mmrec")
    assert not cfg.stops(epoch=30, best_epoch=9, bad_evals=20)
    assert cfg.stops(epoch=30, best_epoch=9, bad_evals=21)
    assert cfg.stops(epoch=500, best_epoch=400, bad_evals=21)


def test_patient_rule_waits_for_min_epochs_and_grows_with_the_best_epoch():
    cfg = EvalConfig(patient_patience=20, protocol="patient", min_epochs=50, patience_ratio=0.5)
    assert not cfg.stops(epoch=40, best_epoch=5, bad_evals=34)      # before min_epochs
    assert cfg.stops(epoch=50, best_epoch=5, bad_evals=44)
    assert not cfg.stops(epoch=500, best_epoch=400, bad_evals=150)  # patience 200 at epoch 400
    assert cfg.stops(epoch=601, best_epoch=400, bad_evals=201)


def test_patient_protocol_trains_at_least_min_epochs(tmp_path):
    data = generate(tmp_path / "data", n_users=40, n_items=30, seed=0)

    def run(protocol: str):
        cfg = TrainConfig.model_validate({
            "seed": 0, "data": {"path": str(data)},
            "backbone": {"name": "bpr", "embedding_size": 8},
            "optim": {"batch_size": 64, "epochs": 12},
            "eval": {"ks": [20], "patience": 0, "patient_patience": 0, "protocol": protocol,
                     "min_epochs": 8}})
        run_stage1(cfg, tmp_path / protocol, torch.device("cpu"))
        return read_metrics(tmp_path / protocol)

    mmrec, patient = run("mmrec"), run("patient")
    assert patient.epochs_run >= 8 and mmrec.epochs_run <= patient.epochs_run
    # the first epochs are the same training either way, so the patient run's best validation
    # is the best over a superset of the same epochs
    assert patient.valid["recall@20"] >= mmrec.valid["recall@20"]


def _history(valid: list[float]) -> list[dict]:
    """A per-epoch history as metrics.json records it (test at each new best)."""
    out, best = [], -1.0
    for epoch, v in enumerate(valid):
        record = {"epoch": epoch, "valid": {"recall@20": v}}
        if v > best:
            best, record["test"] = v, {"recall@20": v / 2}
        out.append(record)
    return out


def test_replay_selects_what_the_rule_would_have_stopped_at():
    history = _history([0.1, 0.2, 0.15, 0.15, 0.15, 0.3, 0.1, 0.1, 0.1, 0.1])
    mmrec = EvalConfig(ks=[20], patience=2, protocol="mmrec")
    got = replay_stopping(history, "recall@20", mmrec.stops, max_epochs=100)
    assert got == {"best_epoch": 1, "epochs_run": 5, "valid": {"recall@20": 0.2},
                   "test": {"recall@20": 0.1}}
    patient = EvalConfig(ks=[20], patient_patience=2, protocol="patient", min_epochs=6)
    got = replay_stopping(history, "recall@20", patient.stops, max_epochs=100)
    assert (got["best_epoch"], got["epochs_run"], got["test"]) == (5, 9, {"recall@20": 0.15})


def test_replay_refuses_a_rule_that_trains_past_the_history():
    history = _history([0.1, 0.2, 0.15, 0.15])
    rule = EvalConfig(ks=[20], patience=5, protocol="mmrec").stops
    with pytest.raises(ValueError, match="past the 4 recorded epochs"):
        replay_stopping(history, "recall@20", rule, 100)
    # a history that ran to max_epochs is complete for any rule
    got = replay_stopping(history, "recall@20", rule, 4)
    assert (got["best_epoch"], got["epochs_run"]) == (1, 4)


def test_mmrec_replayed_from_a_patient_run_equals_a_real_mmrec_run(tmp_path):
    data = generate(tmp_path / "data", n_users=60, n_items=40, seed=1)

    def run(protocol: str):
        cfg = TrainConfig.model_validate({
            "seed": 2, "data": {"path": str(data)},
            "backbone": {"name": "lightgcn", "embedding_size": 8},
            "optim": {"batch_size": 64, "epochs": 30},
            "eval": {"ks": [20], "patience": 1, "patient_patience": 1, "protocol": protocol,
                     "min_epochs": 20}})
        run_stage1(cfg, tmp_path / protocol, torch.device("cpu"))
        return cfg, read_metrics(tmp_path / protocol)

    (mmrec_cfg, mmrec), (_, patient) = run("mmrec"), run("patient")
    assert mmrec.epochs_run < patient.epochs_run          # the replay has something to cut
    assert len(patient.history) == patient.epochs_run
    got = replay_stopping(patient.history, "recall@20", mmrec_cfg.eval.stops,
                          mmrec_cfg.optim.epochs)
    assert got == {"best_epoch": mmrec.best_epoch, "epochs_run": mmrec.epochs_run,
                   "valid": mmrec.valid, "test": mmrec.test}


def test_min_delta_needs_a_relative_gain_and_replays_exactly(tmp_path):
    cfg = EvalConfig(protocol="patient", min_delta=0.01)
    assert cfg.improves(0.1011, 0.1) and not cfg.improves(0.1009, 0.1)
    assert cfg.improves(0.05, float("-inf"))
    assert EvalConfig(protocol="mmrec", min_delta=0.01).improves(0.1001, 0.1)   # mmrec: strict
    data = generate(tmp_path / "data", n_users=60, n_items=40, seed=1)

    def run(name: str, **eval_cfg):
        cfg = TrainConfig.model_validate({
            "seed": 2, "data": {"path": str(data)},
            "backbone": {"name": "lightgcn", "embedding_size": 8},
            "optim": {"batch_size": 64, "epochs": 30},
            "eval": {"ks": [20], "protocol": "patient", "min_epochs": 0, **eval_cfg}})
        run_stage1(cfg, tmp_path / name, torch.device("cpu"))
        return cfg, read_metrics(tmp_path / name)

    _, plain = run("plain", patient_patience=30)
    delta_cfg, delta = run("delta", patient_patience=2, min_delta=0.05)
    assert delta.epochs_run < plain.epochs_run
    got = replay_stopping(plain.history, "recall@20", delta_cfg.eval.stops,
                          delta_cfg.optim.epochs, delta_cfg.eval.improves)
    assert got == {"best_epoch": delta.best_epoch, "epochs_run": delta.epochs_run,
                   "valid": delta.valid, "test": delta.test}
    # the other way round: epoch 1 gains 0.5%, so a 1% min_delta run did not test it
    history = [{"epoch": 0, "valid": {"recall@20": 0.1}, "test": {"recall@20": 0.05}},
               {"epoch": 1, "valid": {"recall@20": 0.1005}},
               {"epoch": 2, "valid": {"recall@20": 0.2}, "test": {"recall@20": 0.1}}]
    strict = EvalConfig(ks=[20], protocol="patient")
    with pytest.raises(ValueError, match="epoch 1 is a new best under this rule"):
        replay_stopping(history, "recall@20", strict.stops, 3, strict.improves)
