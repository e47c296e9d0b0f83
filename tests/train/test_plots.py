"""train.plots on a tiny stage-2 run: t-SNE + KDE of item features before/after stage 2."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train import checkpoint
from train.config import TrainConfig
from train.plots import main, plot_tsne_kde, stage2_feature_sets, tsne_2d
from train.stage1 import run_stage1
from train.config import Stage2Config
from train.stage2 import run_stage2
from train.synthetic import generate
from train.run import BEST


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    data = generate(root / "data", n_users=40, n_items=36, seed=1)
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)},
        "encoders": {"text": {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0},
                     "cache_dir": str(root / "cache")},
        "backbone": {"name": "lightgcn_mm", "modalities": ["text"]},
        "optim": {"batch_size": 256, "epochs": 1}, "eval": {"ks": [10, 20]}})
    run_stage1(cfg, root / "s1", torch.device("cpu"))
    s2 = Stage2Config.model_validate({"method": {"name": "prompt", "n_ctx": 2, "depth": 2},
                                      "modalities": ["text"], "kt_batch_size": 16,
                                      "kt_steps_per_epoch": 1, "epochs": 1})
    run_stage2(root / "s1", s2, root / "s2", torch.device("cpu"))
    return root / "s2"


def test_feature_sets_and_cli(stage2_run, tmp_path, capsys):
    sets = stage2_feature_sets(stage2_run)
    before, after = sets["text"]
    assert before.shape == after.shape and not np.allclose(before, after)
    out = tmp_path / "fig.png"
    assert main([str(stage2_run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(out) in capsys.readouterr().out


def test_reencoding_matches_the_stored_table(stage2_run, tmp_path):
    """Without a feature table in best.pt the tuned towers re-encode the same features."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(stage2_run, copy)
    state = checkpoint.load(copy / BEST)
    stored = state.pop("backbone.features.text").numpy()
    checkpoint.save_atomic(state, copy / BEST)
    np.testing.assert_allclose(stage2_feature_sets(copy)["text"][1], stored, atol=1e-4)


def test_perpeft_run_has_a_feature_set_per_group(stage2_run, tmp_path):
    """A grouped run: one "after" set per user group, from its table block or re-encoded by the
    group's own tuned tower (both agree)."""
    import shutil

    s2 = Stage2Config.model_validate({"method": {"name": "prompt", "n_ctx": 2, "depth": 2},
                                      "modalities": ["text"], "groups": 2, "kt_batch_size": 16,
                                      "kt_steps_per_epoch": 4, "epochs": 1, "keep_start": False,
                                      "learning_rate": 1e-2})
    run_stage2(stage2_run.parent / "s1", s2, tmp_path / "pp", torch.device("cpu"))
    sets = stage2_feature_sets(tmp_path / "pp")
    assert list(sets) == ["text, user group 0", "text, user group 1"]
    (before, first), (_, second) = sets.values()
    assert before.shape == first.shape and not np.allclose(first, second)
    copy = tmp_path / "pp_copy"
    shutil.copytree(tmp_path / "pp", copy)
    state = checkpoint.load(copy / BEST)
    del state["backbone.tables.0.text"]
    checkpoint.save_atomic(state, copy / BEST)
    reencoded = stage2_feature_sets(copy)
    for name, (_, after) in sets.items():
        np.testing.assert_allclose(reencoded[name][1], after, atol=1e-4)


def test_tsne_and_errors(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 6))
    assert tsne_2d(x).shape == (20, 2)
    with pytest.raises(ValueError, match="at least 5"):
        tsne_2d(x[:3])
    with pytest.raises(ValueError, match="no feature sets"):
        plot_tsne_kde({}, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="not a finished stage-2 run"):
        stage2_feature_sets(tmp_path)
