"""Every PEFT method on every tower: only method parameters train, outputs move, merge is exact."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import TypeAdapter, ValidationError
from torch import nn

from train.encoders import (
    TINY_CLIP, MiniLMConfig, OpenClipImageConfig, OpenClipTextConfig, TimmCnnConfig, build_encoder,
)
from train.encoders.peft_methods import (
    PEFT_METHODS, IA3MethodConfig, LoraMethodConfig, PeftMethodConfig, apply_peft, merge_peft,
    meta_clip_towers, param_table,
)
from train.encoders.prompts import PromptConfig, count_trainable, prompted_text_config

TEXTS = ["a red round shoe", "blue cotton shirt, size M"]
METHODS = {  # name -> (small config, substring of every trainable parameter name)
    "prompt": (PromptConfig(n_ctx=2, depth=2), "token_hook.prompts"),
    "lora": (LoraMethodConfig(r=4), ".lora_"),
    "ia3": (IA3MethodConfig(), ".ia3_l."),
}


def _tower(kind: str):
    """A small tower of each kind (the text tower leaves room for 2 prompts; the CNN is the real
    EfficientNet-Lite0 at 64 px)."""
    if kind == "cnn":
        return build_encoder(TimmCnnConfig(image_size=64))
    if kind == "image":
        return build_encoder(OpenClipImageConfig(model=TINY_CLIP, init_seed=0))
    if kind == "text":
        return build_encoder(prompted_text_config(OpenClipTextConfig(model=TINY_CLIP, init_seed=0), 2))
    return build_encoder(MiniLMConfig(max_seq_length=12))


def _inputs(tower):
    """Two prepared items for a tower."""
    if tower.modality == "image":
        return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return tower.prepare(TEXTS)


def test_registry_covers_the_config_union():
    assert set(PEFT_METHODS) == set(METHODS)
    adapter = TypeAdapter(PeftMethodConfig)
    for name, entry in PEFT_METHODS.items():
        assert isinstance(adapter.validate_python({"name": name}), entry.config)
    assert adapter.validate_python({"name": "lora", "r": 4, "targets": ["mlp.c_fc"]}).r == 4
    for bad in [{"name": "lora", "rank": 4}, {"name": "lora", "r": 0}, {"name": "nope"},
                {"name": "ia3", "targets": ["mlp.c_fc"]}, {"name": "prompt", "n_ctx": -1}]:
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)


@pytest.mark.parametrize("kind", ["image", "text", "minilm", "cnn"])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_contract(method, kind):
    cfg, marker = METHODS[method]
    tower = _tower(kind).requires_grad_(False)
    if method == "prompt" and kind == "cnn":  # deep prompts are ViT-only
        with pytest.raises(ValueError, match="lora or ia3"):
            apply_peft(tower, cfg)
        return
    x = _inputs(tower)
    keys = set(tower.state_dict())
    with torch.no_grad():
        frozen = tower(x)
    apply_peft(tower, cfg)
    trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
    assert trainable and all(marker in n for n in trainable)
    if method != "prompt":  # LoRA (B = 0) and (IA)^3 (scales = 1) start as the identity
        with torch.no_grad():
            torch.testing.assert_close(tower(x), frozen, atol=1e-6, rtol=0)
    params = [p for p in tower.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    target = torch.randn(2, tower.out_dim, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        (-(tower(x) * target).sum()).backward()
        assert all((p.grad is not None) == p.requires_grad for p in tower.parameters())
        opt.step()
    with torch.no_grad():
        trained = tower(x)
        assert (trained - frozen).abs().max() > 1e-4
        if kind == "cnn":  # 16 BatchNorm'd blocks amplify float32 reordering: compare in float64
            tower, x = tower.double(), x.double()
            trained = tower(x)
        merged = merge_peft(tower)
        torch.testing.assert_close(merged(x), trained, atol=1e-5, rtol=0)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not hasattr(merged, "peft_config")
    extra = {"token_hook.prompts"} if method == "prompt" else set()
    assert set(merged.state_dict()) == keys | extra  # a plain tower again (plus the prompt hook)


def test_default_configs_train_under_two_percent_of_vit_b32_and_minilm():
    defaults = [PromptConfig(), LoraMethodConfig(), IA3MethodConfig()]
    image, _ = meta_clip_towers("ViT-B-32")
    image_rows = param_table(lambda: meta_clip_towers("ViT-B-32")[0], defaults)
    text_rows = param_table(lambda: meta_clip_towers("ViT-B-32", n_ctx=2)[1], defaults)
    minilm_rows = param_table(lambda: build_encoder(MiniLMConfig()), defaults)
    assert count_trainable(image)[1] == 87_849_216  # ViT-B/32 vision tower
    counts = {(r.method, "image"): r.trainable for r in image_rows}
    assert counts[("prompt", "image")] == 9 * 2 * 768
    assert counts[("lora", "image")] == 12 * 8 * (768 + 3072) * 2  # c_fc and c_proj, r = 8
    assert counts[("ia3", "image")] == 12 * (3072 + 3072)  # c_fc output, c_proj input
    assert {r.method: r.trainable for r in minilm_rows}["ia3"] == 6 * (384 + 384 + 1536)
    for row in image_rows + text_rows + minilm_rows:
        assert 0 < row.share < 0.02, row


def test_lora_never_wraps_multihead_attention():
    tower = _tower("image")
    with pytest.raises(ValueError, match="MultiheadAttention"):
        apply_peft(tower, LoraMethodConfig(targets=["attn"]))
    with pytest.raises(ValueError):
        apply_peft(_tower("image"), LoraMethodConfig(targets=["no_such_layer"]))


class _Attn(nn.Module):
    """A bare self-attention module, for the peft canary below."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_installed_peft_still_double_merges_mha_out_proj():
    """Canary for huggingface/peft#3774: when this fails, LoRA on `attn` can be offered."""
    torch.manual_seed(0)
    model, reference = _Attn(), _Attn()
    reference.load_state_dict(model.state_dict())
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["attn"], init_lora_weights=False)
    lora = inject_adapter_in_model(cfg, model).attn
    with torch.no_grad():
        reference.attn.in_proj_weight += lora.get_delta_weight("default")
        reference.attn.out_proj.weight += 2 * lora.base_layer.out_proj.get_delta_weight("default")
        x = torch.randn(2, 3, 8)
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)
