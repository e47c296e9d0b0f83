"""train.report: one self-contained page of a finished run (and that it opens in Chromium)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.browser import Browser
from train.config import TrainConfig
from train.report import main
from train.run import CONFIG, METRICS, REPORT, read_metrics
from train.stage1 import run_stage1
from train.synthetic import generate


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory) -> Path:
    """A two-epoch BPR run on a tiny synthetic catalogue."""
    root = tmp_path_factory.mktemp("report")
    data = generate(root / "data", n_users=40, n_items=30, seed=0)
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)}, "backbone": {"name": "bpr", "embedding_size": 8},
        "optim": {"batch_size": 64, "epochs": 2}, "eval": {"ks": [10, 20]}})
    run_stage1(cfg, root / "run", torch.device("cpu"))
    return root / "run"


def test_report_of_a_stage1_run(stage1_run):
    assert main([str(stage1_run)]) == 0
    page = (stage1_run / REPORT).read_text()
    m = read_metrics(stage1_run)
    assert f"<td>{m.test['recall@20']:.4f}</td>" in page and f"<td>{m.valid['ndcg@10']:.4f}</td>" in page
    assert "stage-1 run" in page and 'src="data:image/png;base64,' in page  # curves embedded
    assert "embedding_size: 8" in page                                      # the config as written


def test_the_report_opens_in_chromium_without_errors(stage1_run, chromium, tmp_path):
    out = tmp_path / "report.html"
    assert main([str(stage1_run), "--out", str(out)]) == 0
    with Browser(chromium, tmp_path / "profile", 1200, 900) as browser:
        assert browser.goto(out.as_uri()) == 200
        images = browser.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
        title = browser.evaluate("document.title")
        errors = browser.errors()
    assert errors == [] and images and all(width > 0 for width in images)  # the plots decode
    assert title == f"Run report: {stage1_run.name}"


def test_config_text_is_escaped_and_a_missing_run_is_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "no metrics" in capsys.readouterr().err
    run = tmp_path / "r"
    run.mkdir()
    (run / METRICS).write_text('{"valid": {"recall@20": 0.1}, "test": {"recall@20": 0.2}, '
                                      '"best_epoch": 0, "epochs_run": 1}')
    (run / CONFIG).write_text("note: <script>alert(1)</script>\n")
    assert main([str(run)]) == 0
    page = (run / REPORT).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
