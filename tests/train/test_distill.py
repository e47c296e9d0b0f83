"""train.distill: the rank-d initialisation, the KD losses, and a student run that exports."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export import export_run
from train.run import BEST, METRICS, load_run
from index.bundle import load_bundle
from train.config import TrainConfig
from train.distill import (DistillConfig, list_kd, low_rank_factors, main, pair_kd,
                           relative_error, run_distill, student_config)
from train.stage1 import run_stage1
from train.synthetic import generate

CPU = torch.device("cpu")


def test_low_rank_factors_are_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(30, 8, generator=g), torch.randn(20, 8, generator=g)
    scores = (users @ items.T).double().numpy()
    u, s, vt = np.linalg.svd(scores)
    fu, fi = low_rank_factors(users, items, 3)
    assert fu.shape == (30, 3) and fi.shape == (20, 3)
    np.testing.assert_allclose((fu @ fi.T).numpy(), (u[:, :3] * s[:3]) @ vt[:3], atol=1e-4)
    # wider than the teacher's rank: exact, the extra columns are zero
    fu, fi = low_rank_factors(users, items, 12)
    np.testing.assert_allclose((fu @ fi.T).numpy(), scores, atol=1e-4)
    assert not fu[:, 8:].any() and not fi[:, 8:].any()
    # the Gram-matrix relative error equals the dense one
    fu, fi = low_rank_factors(users, items, 3)
    dense = torch.linalg.norm(users @ items.T - fu @ fi.T) / torch.linalg.norm(users @ items.T)
    assert relative_error(users, items, fu, fi) == pytest.approx(dense.item(), rel=1e-4)
    assert relative_error(users, items, users, items) == pytest.approx(0.0, abs=1e-6)


def test_kd_losses_vanish_only_when_the_student_agrees():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(64, generator=g) * 3
    assert pair_kd(t, t).abs().item() < 1e-6
    assert pair_kd(torch.zeros(64), t).item() > 0.1
    lists = torch.randn(16, 11, generator=g)
    assert list_kd(lists + 5.0, lists).abs().item() < 1e-6      # softmax is shift-invariant
    assert list_kd(-lists, lists).item() > 0.1
    # the gradient moves the student's margin towards the teacher's
    s = torch.zeros(64, requires_grad=True)
    pair_kd(s, t).backward()
    assert (torch.sign(-s.grad) == torch.sign(t)).all()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data"), n_users=120, n_items=80, seed=0)


def teacher_run(root, data_dir, backbone: dict, **extra):
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data_dir)}, "backbone": backbone,
        "optim": {"batch_size": 256, "epochs": 6}, "eval": {"ks": [10, 20], "patience": 5}}
        | extra)
    run = root / "teacher"
    run_stage1(cfg, run, CPU)
    return run


def test_untrained_svd_student_of_full_rank_reproduces_the_teacher(tmp_path, data_dir):
    """A BPR student as wide as a BPR teacher, SVD-initialised and never moved (lr 0), ranks
    exactly like the teacher: the initialisation and the user / item alignment are right."""
    teacher = teacher_run(tmp_path, data_dir, {"name": "bpr", "embedding_size": 16})
    dcfg = DistillConfig.model_validate({
        "student": {"name": "bpr", "embedding_size": 16},
        "optim": {"learning_rate": 0.0, "batch_size": 256, "epochs": 1}})
    metrics = run_distill(teacher, dcfg, tmp_path / "student", CPU)
    t = json.loads((teacher / METRICS).read_text())
    for k in ("recall@20", "ndcg@20"):
        assert metrics["test"][k] == pytest.approx(t["test"][k], abs=1e-9)
    assert metrics["distill"]["svd_relative_error"] < 1e-5


def test_student_run_loads_and_exports_as_a_plain_run(tmp_path, data_dir):
    teacher = teacher_run(tmp_path, data_dir, {"name": "lightgcn", "embedding_size": 32})
    out = tmp_path / "student"
    dcfg = DistillConfig.model_validate({"optim": {"batch_size": 256, "epochs": 3},
                                         "student": {"name": "lightgcn", "embedding_size": 8,
                                                     "n_layers": 1}})
    metrics = run_distill(teacher, dcfg, out, CPU)
    info = metrics["distill"]
    assert info["student_dim"] == 8 and info["teacher_dim"] == 32
    assert info["item_vector_bytes"] == {"teacher": 128, "student": 32}
    assert 0 < info["svd_relative_error"] < 1
    assert 0 <= metrics["test"]["recall@20"] <= 1 and metrics["epochs_run"] == 3
    keys = torch.load(out / BEST, weights_only=True).keys()
    assert keys and all(k.startswith("backbone.") and ".student." not in k for k in keys)
    run = load_run(out)
    assert run.cfg.backbone.name == "lightgcn" and run.cfg.backbone.embedding_size == 8
    assert run.model.item_embeddings().shape == (80, 8)
    bundle = load_bundle(export_run(out, tmp_path / "bundles"))
    assert bundle.manifest.dim == 8 and bundle.manifest.backbone == "lightgcn"


def test_student_of_a_multimodal_teacher_gets_heads_in_its_own_space(tmp_path, data_dir):
    teacher = teacher_run(
        tmp_path, data_dir, {"name": "lightgcn", "embedding_size": 32, "n_layers": 1},
        encoders={"text": {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0},
                  "cache_dir": str(tmp_path / "cache")},
        heads={"modalities": ["text"]}, cold_start={"holdout_fraction": 0.1, "ks": [10, 20]})
    dcfg = DistillConfig.model_validate({"optim": {"batch_size": 256, "epochs": 2},
                                         "student": {"name": "bpr", "embedding_size": 8}})
    metrics = run_distill(teacher, dcfg, tmp_path / "student", CPU)
    run = load_run(tmp_path / "student")
    assert run.heads is not None and run.cfg.encoders is not None
    assert run.heads(run.heads.select(run.features, torch.arange(3))).shape == (3, 8)
    assert "heads" in metrics["cold_start"]
    # the same items are held out of training as for the teacher
    np.testing.assert_array_equal(run.train.train, load_run(teacher).train.train)


def test_id_only_teacher_gives_an_id_only_student():
    teacher = TrainConfig.model_validate({
        "data": {"path": "x"}, "backbone": {"name": "freedom"},
        "encoders": {"text": {"name": "minilm"}}})
    cfg = student_config(teacher, DistillConfig())
    assert cfg.backbone.name == "lightgcn" and cfg.backbone.embedding_size == 32
    assert cfg.encoders is None and cfg.optim == teacher.optim and cfg.seed == teacher.seed


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    assert "no best.pt" in capsys.readouterr().err
    assert main(["--teacher", str(tmp_path), "--out", str(tmp_path / "s"),
                 "--set", "temperature=0"]) == 2
    assert "temperature" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {name: freedom}\n")
    assert main(["--teacher", str(tmp_path), "--config", str(bad), "--out", str(tmp_path)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_a_stage2_teacher_is_distilled_from_its_tuned_vectors(tmp_path, data_dir):
    """The teacher's scores are the stage-2 model's (tuned features), not its stage-1 config's:
    an untrained full-width BPR student reproduces the stage-2 run's test figures exactly."""
    from train.config import Stage2Config
    from train.stage2 import run_stage2

    stage1 = teacher_run(
        tmp_path, data_dir, {"name": "lightgcn_mm", "modalities": ["text"], "embedding_size": 16},
        encoders={"text": {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0},
                  "cache_dir": str(tmp_path / "cache")}, heads={"modalities": ["text"]})
    s2 = Stage2Config.model_validate({
        "method": {"name": "prompt", "n_ctx": 2, "depth": 2}, "modalities": ["text"],
        "kt_batch_size": 16, "kt_steps_per_epoch": 2, "epochs": 1, "learning_rate": 1e-2,
        "keep_start": False})
    stage2 = tmp_path / "stage2"
    s2_metrics = run_stage2(stage1, s2, stage2, CPU)
    s1_test = json.loads((stage1 / METRICS).read_text())["test"]
    assert s2_metrics["test"] != s1_test, "stage 2 must rank differently for this test to bite"
    dcfg = DistillConfig.model_validate({
        "student": {"name": "bpr", "embedding_size": 16},
        "optim": {"learning_rate": 0.0, "batch_size": 256, "epochs": 1}})
    metrics = run_distill(stage2, dcfg, tmp_path / "student", CPU)
    assert metrics["distill"]["teacher_test"] == s2_metrics["test"]
    for k in ("recall@20", "ndcg@20"):
        assert metrics["test"][k] == pytest.approx(s2_metrics["test"][k], abs=1e-9)
