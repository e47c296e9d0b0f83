"""The retraining job trains, exports and publishes; failures publish nothing."""
from __future__ import annotations

import fcntl
import json

import numpy as np
import pytest
import yaml

from export.guard import STATUS_FILE, bundle_recall
from export.retrain import EXIT_KEPT_LIVE, LOCK, main
from index.bundle import current_version, list_versions, load_bundle
from train.data import load_dataset
from train.synthetic import generate
from train.run import METRICS


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    generate(root / "data", n_users=60, n_items=40, seed=1)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "seed": 0, "data": {"path": str(root / "data")},
        "backbone": {"name": "bpr", "embedding_size": 8},
        "optim": {"batch_size": 256, "epochs": 2}, "eval": {"ks": [10, 20]}}))
    return path


def _args(config, tmp_path, *extra):
    return ["--config", str(config), "--bundles", str(tmp_path / "bundles"),
            "--runs-dir", str(tmp_path / "runs"), *extra]


def test_two_retrains_publish_v1_then_v2(config, tmp_path):
    assert main(_args(config, tmp_path)) == 0
    assert current_version(tmp_path / "bundles") == "v1"
    assert main(_args(config, tmp_path, "--set", "optim.epochs=1", "--tolerance", "1")) == 0
    assert current_version(tmp_path / "bundles") == "v2"
    assert list_versions(tmp_path / "bundles") == [1, 2]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    assert load_bundle(tmp_path / "bundles" / "v2").manifest.source_run == str(runs[1].resolve())


def test_publish_guard_keeps_a_better_live_bundle_unless_forced(config, tmp_path):
    trained = ["--set", "optim.epochs=60", "--set", "optim.learning_rate=0.01"]
    assert main(_args(config, tmp_path, *trained)) == 0
    assert main(_args(config, tmp_path, "--set", "optim.epochs=1")) == EXIT_KEPT_LIVE
    status = json.loads((tmp_path / "bundles" / STATUS_FILE).read_text())
    assert status["status"] == "kept_live" and status["fresh"]["recall"] < status["live"]["recall"]
    assert status["fresh"]["users"] > 0 and "v2 recall@20" in status["reason"]
    assert current_version(tmp_path / "bundles") == "v1"   # v2 exported, never published
    assert main(_args(config, tmp_path, "--set", "optim.epochs=1", "--force")) == 0
    assert current_version(tmp_path / "bundles") == "v3"
    assert json.loads((tmp_path / "bundles" / STATUS_FILE).read_text())["status"] == "published"


def test_guard_scores_a_bundle_like_the_server(config, tmp_path):
    """The guard's recall of a bundle equals a brute-force ranking of its own vectors."""
    assert main(_args(config, tmp_path, "--set", "optim.epochs=30")) == 0
    data = load_dataset(yaml.safe_load(config.read_text())["data"]["path"])
    path = tmp_path / "bundles" / "v1"
    b = load_bundle(path)
    users, uids = b.load_npy("users.npy"), b.load_npy("user_ids.npy")
    items = _item_vectors(b)
    score = bundle_recall(path, data.valid, data.train, 20)
    rows = {int(u): r for r, u in enumerate(uids)}
    expected, n = 0.0, 0
    for u in np.unique(data.valid[:, 0]):
        if int(u) not in rows:
            continue
        s = items[1] @ users[rows[int(u)]]
        s[np.isin(items[0], data.train[data.train[:, 0] == u, 1])] = -np.inf
        top = items[0][np.argsort(-s, kind="stable")[:20]]
        truth = data.valid[data.valid[:, 0] == u, 1]
        expected += np.isin(truth, top).sum() / len(truth)
        n += 1
    assert score.users == n and score.recall == pytest.approx(expected / n, abs=1e-9)


def _item_vectors(b):
    from index import ann
    index = ann.load(b.file("items.faiss"))
    ids = b.load_npy("item_ids.npy")
    return ids, np.stack([index.reconstruct(int(i)) for i in ids])


def test_failures_publish_nothing(config, tmp_path):
    assert main(_args(config, tmp_path)) == 0
    assert main(_args(config, tmp_path, "--set", "data.path=/nonexistent")) == 1
    assert main(_args(config, tmp_path, "--set", "backbone.bogus=1")) == 2
    assert main(_args(config, tmp_path, "--factory", "NotAFactory")) == 1
    with open(tmp_path / "bundles" / LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(_args(config, tmp_path)) == 3
    assert list_versions(tmp_path / "bundles") == [1]
    assert current_version(tmp_path / "bundles") == "v1"


def test_distilled_student_is_published_unless_it_falls_short(config, tmp_path):
    distill = tmp_path / "distill.yaml"
    distill.write_text(yaml.safe_dump({"student": {"name": "bpr", "embedding_size": 4}}))
    assert main(_args(config, tmp_path, "--distill", str(distill), "--min-kept", "0")) == 0
    (run,) = sorted((tmp_path / "runs").iterdir())
    bundle = load_bundle(tmp_path / "bundles" / "v1")
    assert bundle.manifest.source_run == str((run / "student").resolve())
    assert bundle.manifest.dim == 4
    # a student that cannot keep 1000x the teacher's validation recall: the teacher is published
    assert main(_args(config, tmp_path, "--distill", str(distill), "--min-kept", "1000")) == 0
    run = sorted((tmp_path / "runs").iterdir())[-1]
    bundle = load_bundle(tmp_path / "bundles" / "v2")
    assert (run / "student" / METRICS).is_file()
    assert bundle.manifest.source_run == str(run.resolve()) and bundle.manifest.dim == 8
    # an invalid distillation config fails before any training
    distill.write_text("student: {name: freedom}\n")
    assert main(_args(config, tmp_path, "--distill", str(distill))) == 2
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert current_version(tmp_path / "bundles") == "v2"


def test_stage2_is_published_unless_it_validates_worse(tmp_path):
    """--stage2 tunes the fresh run (here PerPEFT with 2 groups) and publishes it; with nothing
    learned (lr 0, identity (IA)^3) it ties stage 1 on validation and still goes on."""
    generate(tmp_path / "data", n_users=60, n_items=40, seed=1)
    config = tmp_path / "mm.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 0, "data": {"path": str(tmp_path / "data")},
        "encoders": {"text": {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0},
                     "cache_dir": str(tmp_path / "cache")},
        "backbone": {"name": "lightgcn_mm", "modalities": ["text"]},
        "heads": {"modalities": ["text"]},
        "optim": {"batch_size": 256, "epochs": 2}, "eval": {"ks": [10, 20]}}))
    stage2 = tmp_path / "stage2.yaml"
    stage2.write_text(yaml.safe_dump({
        "method": {"name": "ia3"}, "modalities": ["text"], "groups": 2, "kt_batch_size": 16,
        "kt_steps_per_epoch": 1, "epochs": 1, "learning_rate": 0.0}))
    assert main(_args(config, tmp_path, "--stage2", str(stage2))) == 0
    (run,) = sorted((tmp_path / "runs").iterdir())
    manifest = load_bundle(tmp_path / "bundles" / "v1").manifest
    assert manifest.source_run == str((run / "stage2").resolve())
    assert manifest.user_groups == 2 and manifest.encoder.encoder_tuning == "ia3"
    # an invalid stage-2 config fails before any training
    stage2.write_text("groups: 0\n")
    assert main(_args(config, tmp_path, "--stage2", str(stage2))) == 2
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_stage2_below_stage1_goes_on_with_stage1(tmp_path, monkeypatch):
    from export import retrain
    from train.config import Stage2Config, TrainConfig
    from train.run import write_metrics

    write_metrics(tmp_path, {"valid": {"recall@20": 0.5}, "test": {"recall@20": 0.4},
                             "best_epoch": 3, "epochs_run": 5})
    cfg = TrainConfig.model_validate({"data": {"path": str(tmp_path)}, "backbone": {"name": "bpr"}})
    for tuned, expected in ((0.4, tmp_path), (0.5, tmp_path / "stage2")):
        monkeypatch.setattr(retrain, "run_stage2",
                            lambda *a, v=tuned: {"valid": {"recall@20": v}})
        assert retrain.tuned_or_stage1(tmp_path, Stage2Config(), cfg) == expected
