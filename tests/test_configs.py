"""Every checked-in config validates (stage 1: TrainConfig; stage 2: Stage2Config); overrides and
unknown keys behave."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ALL = sorted((ROOT / "configs").rglob("*.yaml"))
STAGE2 = [p for p in ALL if "stage2" in p.relative_to(ROOT / "configs").parts]
DISTILL = [p for p in ALL if "distill" in p.relative_to(ROOT / "configs").parts]
CONFIGS = [p for p in ALL if p not in STAGE2 and p not in DISTILL]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_configs_exist():
    names = {str(p.relative_to(ROOT / "configs")) for p in ALL}
    assert {"demo.yaml", "baby/bpr.yaml", "baby/lightgcn.yaml"} <= names
    assert {"ml100k/stage2/prompt.yaml", "ml100k/stage2/lora.yaml",
            "ml100k/stage2/ia3.yaml", "distill/lightgcn32.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_config_validates(path):
    cfg = load_config(path)
    assert cfg.backbone.name and cfg.data.path


@pytest.mark.parametrize("path", STAGE2, ids=_id)
def test_stage2_config_validates(path):
    """Stage-2 configs validate, tune one pretrained tower of the ml100k configs (MiniLM text or
    EfficientNet-Lite0 image; prompts only on the text one), and train < 2% of it."""
    from train.encoders import MiniLMConfig, TimmCnnConfig, build_encoder
    from train.encoders.peft_methods import apply_peft, check_peft_fits
    from train.encoders.prompts import count_trainable
    from train.config import Stage2Config

    s2 = Stage2Config.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    assert s2.modalities in (["text"], ["image"])
    ml100k = load_config(ROOT / "configs/ml100k/lightgcn_mm.yaml").encoders
    assert isinstance(ml100k.image, TimmCnnConfig) and isinstance(ml100k.text, MiniLMConfig)
    check_peft_fits(ml100k, s2.method, s2.modalities)
    cfg = ml100k.text if s2.modalities == ["text"] else ml100k.image.model_copy(
        update={"image_size": 64})
    tower = build_encoder(cfg)
    encoder = count_trainable(tower)[1]
    trainable = count_trainable(apply_peft(tower, s2.method))[0]
    assert 0 < trainable < 0.02 * encoder



@pytest.mark.parametrize("path", DISTILL, ids=_id)
def test_distill_config_validates(path):
    from train.distill import load_distill_config

    dcfg = load_distill_config(path, [])
    assert dcfg.student.embedding_size < 64, "a student is smaller than the 64-d teachers"


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
