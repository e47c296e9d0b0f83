"""Every checked-in config validates; overrides and unknown keys behave."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}
    assert {"demo.yaml", "baby/bpr.yaml", "baby/lightgcn.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_validates(path):
    cfg = load_config(path)
    assert cfg.backbone.name and cfg.data.path


def test_override_and_unknown_key():
    cfg = load_config(ROOT / "configs/baby/lightgcn.yaml",
                      ["data.path=/tmp/x", "backbone.n_layers=3", "optim.lr_scheduler=[0.96, 50]"])
    assert str(cfg.data.path) == "/tmp/x" and cfg.backbone.n_layers == 3
    assert cfg.optim.lr_scheduler == (0.96, 50.0)
    with pytest.raises(ValidationError, match="n_layer"):
        load_config(ROOT / "configs/baby/lightgcn.yaml", ["backbone.n_layer=3"])
    with pytest.raises(ValidationError):
        load_config(ROOT / "configs/baby/bpr.yaml", ["backbone.n_layers=3"])  # not a BPR key
    with pytest.raises(ValueError, match="a.b=value"):
        load_config(ROOT / "configs/baby/bpr.yaml", ["backbone"])
