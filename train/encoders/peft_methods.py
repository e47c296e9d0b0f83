"""PEFT methods attached to a tower from outside: IVLP prompts, LoRA and (IA)^3 through `peft`.

`apply_peft(tower, cfg)` freezes the tower and adds the method's parameters (the only trainable ones);
`merge_peft(tower)` folds adapters into the base weights and removes every peft layer, for export.
Prompts (IVLP, Khattak et al. 2023; prompts.py) have nothing to fold: they stay as the token hook
and are exported as part of the graph. LoRA (Hu et al. 2022) and (IA)^3 (Liu et al. 2022) are
injected with `peft.inject_adapter_in_model` (Mangrulkar et al., huggingface/peft), which works on
plain `nn.Module`s; targets follow peft's matching (a list matches name suffixes, a string is a
full-match regex). Defaults per tower family:

- open_clip: LoRA and (IA)^3 on the MLP Linear layers `mlp.c_fc` / `mlp.c_proj`; (IA)^3 scales the
  c_fc output and the c_proj input (the FFN activation, IA3's l_ff). Attention is not offered: in
  open_clip 3.3 it is `nn.MultiheadAttention`, and peft 0.21.2's `lora.MultiheadAttention.merge`
  still adds the out_proj delta twice (it writes W + dW, then `out_proj.merge()` adds dW again;
  fix pending in huggingface/peft#3774), so its forward runs W_out + 2 dW while gradients see one dW.
  `apply_peft` refuses targets that match a MultiheadAttention. (IA)^3 supports only Linear/Conv.
- BERT (MiniLM): LoRA on every block Linear (query, key, value, dense); (IA)^3 on key, value and
  the FFN output dense (input-scaled), as peft's BERT default but without the attention output dense.
- timm CNNs (EfficientNet-Lite, timm_cnn.py): LoRA (peft's Conv2d LoRA) on the 1x1 convolutions,
  the inverted residuals' expansion `conv_pw` and projection `conv_pwl` and the `conv_head`;
  (IA)^3 scales the input of every `conv_pwl` (the expanded activation, the FFN analogue of l_ff)
  and the output of `conv_head`. Depthwise convolutions and the TF-"SAME"-padded stride-2 convs are
  not targeted (peft's conv LoRA repeats the base conv's static padding and groups). Deep prompts
  are refused on CNNs (`check_peft_fits` at config time, `attach_prompts` at attach time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable, Literal, Union

import open_clip
import torch
from peft import IA3Config, LoraConfig, inject_adapter_in_model
from peft.config import PeftConfig as PeftLibConfig
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from pydantic import Field, model_validator
from torch import nn

from train.encoders.base import Strict, Tower
from train.encoders.minilm import MiniLMTower
from train.encoders.openclip import OpenClipImageTower, OpenClipTextTower
from train.encoders.timm_cnn import TimmCnnTower
from train.encoders.preprocess import PreprocessSpec
from train.encoders.prompts import PromptConfig, attach_prompts, count_trainable

Targets = Union[list[str], str]

DEFAULT_TARGETS: dict[str, dict[str, tuple[Targets, Targets | None]]] = {
    "lora": {
        "openclip": (["mlp.c_fc", "mlp.c_proj"], None),
        "bert": (["query", "key", "value", "dense"], None),
        "timm_cnn": (["conv_pw", "conv_pwl", "conv_head"], None),
    },
    "ia3": {  # (targets, feedforward_modules: input-scaled)
        "openclip": (["mlp.c_fc", "mlp.c_proj"], ["mlp.c_proj"]),
        "bert": (r".*\.(key|value)|.*\.\d+\.output\.dense", r".*\.\d+\.output\.dense"),
        "timm_cnn": (["conv_pwl", "conv_head"], ["conv_pwl"]),
    },
}


class LoraMethodConfig(Strict):
    """LoRA: W + (alpha / r) B A on the target Linear layers; B starts at zero."""

    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: Targets | None = Field(None, description="None = the tower family's default")


class IA3MethodConfig(Strict):
    """(IA)^3: learned per-channel scales (init 1) on target outputs, or inputs for feedforward ones."""

    name: Literal["ia3"] = "ia3"
    targets: Targets | None = Field(None, description="None = the tower family's default")
    feedforward: Targets | None = Field(None, description="targets whose input is scaled")

    @model_validator(mode="after")
    def _both_or_neither(self) -> IA3MethodConfig:
        if (self.targets is None) != (self.feedforward is None):
            raise ValueError("set both targets and feedforward, or neither (tower defaults)")
        return self


PeftMethodConfig = Annotated[
    Union[PromptConfig, LoraMethodConfig, IA3MethodConfig], Field(discriminator="name")
]


def tower_family(tower: Tower) -> str:
    """'openclip', 'bert' or 'timm_cnn': which default target names apply."""
    if isinstance(tower, (OpenClipImageTower, OpenClipTextTower)):
        return "openclip"
    if isinstance(tower, MiniLMTower):
        return "bert"
    if isinstance(tower, TimmCnnTower):
        return "timm_cnn"
    raise NotImplementedError(f"no default PEFT targets for {type(tower).__name__}; set targets")


def _refuse_mha(tower: nn.Module, config: PeftLibConfig) -> None:
    """Raise if LoRA would wrap an nn.MultiheadAttention (peft's out_proj double-merge bug)."""
    for name, module in tower.named_modules():
        if isinstance(module, nn.MultiheadAttention) and check_target_module_exists(config, name):
            raise ValueError(
                f"target {name!r} is an nn.MultiheadAttention: peft's LoRA for it merges out_proj twice "
                "(huggingface/peft#3774); target the Linear layers mlp.c_fc / mlp.c_proj instead"
            )


def _inject(tower: Tower, config: PeftLibConfig) -> Tower:
    """Freeze the tower, then inject adapters in place; only adapter parameters train."""
    for p in tower.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, tower)
    tower.train(tower.training)  # new adapter modules follow the tower's train/eval mode
    if not any(p.requires_grad for p in tower.parameters()):
        raise ValueError(f"no module of {type(tower).__name__} matched {config.target_modules!r}")
    return tower


def _apply_prompt(tower: Tower, cfg: PromptConfig) -> Tower:
    """Attach IVLP deep prompts as the token hook."""
    attach_prompts(tower, cfg)
    return tower


def _apply_lora(tower: Tower, cfg: LoraMethodConfig) -> Tower:
    """Inject LoRA into the target Linear layers."""
    targets = cfg.targets if cfg.targets is not None else DEFAULT_TARGETS["lora"][tower_family(tower)][0]
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none")
    _refuse_mha(tower, config)
    return _inject(tower, config)


def _apply_ia3(tower: Tower, cfg: IA3MethodConfig) -> Tower:
    """Inject (IA)^3 scaling vectors into the target Linear layers."""
    targets, feedforward = cfg.targets, cfg.feedforward
    if targets is None:
        targets, feedforward = DEFAULT_TARGETS["ia3"][tower_family(tower)]
    return _inject(tower, IA3Config(target_modules=targets, feedforward_modules=feedforward))


@dataclass(frozen=True)
class PeftMethod:
    """A registered method: its config class and how it attaches to a tower."""

    config: type[Strict]
    apply: Callable[[Tower, Any], Tower]
    merges: bool  # False: nothing to fold (the method stays in the graph)


PEFT_METHODS: dict[str, PeftMethod] = {
    "prompt": PeftMethod(PromptConfig, _apply_prompt, merges=False),
    "lora": PeftMethod(LoraMethodConfig, _apply_lora, merges=True),
    "ia3": PeftMethod(IA3MethodConfig, _apply_ia3, merges=True),
}


def check_peft_fits(encoders: Any, method: Any, modalities: Iterable[str]) -> None:
    """Config-time check, before anything is built: deep prompts only on towers that take them."""
    from train.encoders import ENCODERS

    if method.name != "prompt":
        return
    for m in modalities:
        tower_cfg = getattr(encoders, m, None)
        if tower_cfg is not None and not ENCODERS[tower_cfg.name].takes_prompts:
            raise ValueError(f"stage 2 method prompt on the {m} tower: {tower_cfg.name} is a CNN "
                             "and deep prompts are ViT/transformer-only; use method lora or ia3")


def apply_peft(tower: Tower, cfg: PromptConfig | LoraMethodConfig | IA3MethodConfig) -> Tower:
    """Attach a PEFT method in place: the tower is frozen except the method's parameters."""
    return PEFT_METHODS[cfg.name].apply(tower, cfg)


def merge_peft(tower: Tower) -> Tower:
    """Fold every peft adapter into its base layer and remove the peft layers (in place)."""
    names = [n for n, m in tower.named_modules() if isinstance(m, BaseTunerLayer)]
    outer = [n for n in names if not any(n.startswith(o + ".") for o in names)]
    for name in outer:
        parent_name, _, child = name.rpartition(".")
        parent = tower.get_submodule(parent_name)
        layer = getattr(parent, child)
        layer.merge()
        setattr(parent, child, layer.get_base_layer())
    if "peft_config" in vars(tower):
        del tower.peft_config
    return tower


@dataclass(frozen=True)
class ParamCount:
    """Trainable parameters of one method on one tower, and their share of the encoder's."""

    method: str
    trainable: int
    encoder: int  # parameters of the tower before the method was applied

    @property
    def share(self) -> float:
        """trainable / encoder."""
        return self.trainable / self.encoder


def param_table(make_tower: Callable[[], Tower], configs: Iterable[Any]) -> list[ParamCount]:
    """Apply each method to a fresh tower from `make_tower` and count (for bench/peft_table.py)."""
    rows = []
    for cfg in configs:
        tower = make_tower()
        encoder = count_trainable(tower)[1]
        trainable = count_trainable(apply_peft(tower, cfg))[0]
        rows.append(ParamCount(cfg.name, trainable, encoder))
    return rows


def meta_clip_towers(model: str = "ViT-B-32", n_ctx: int = 0) -> tuple[OpenClipImageTower, OpenClipTextTower]:
    """Weightless towers on the meta device (text leaves n_ctx positions for prompts), for counting."""
    model_cfg = open_clip.get_model_config(model)
    if model_cfg is None or "custom_text" in model_cfg:
        raise ValueError(f"{model!r} is not a registered open_clip.CLIP architecture")
    with torch.device("meta"):
        clip = open_clip.CLIP(**model_cfg)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    spec = PreprocessSpec.from_open_clip({"size": clip.visual.image_size, "mean": mean, "std": std})
    image = OpenClipImageTower(clip.visual, spec, f"{model}|meta")
    text = OpenClipTextTower(clip, None, f"{model}|meta", clip.context_length - n_ctx)
    return image, text
