"""ONNX wrappers on tiny towers: open_clip text export (fixed length), int8, exporter fallback;
the EfficientNet-Lite0 CNN tower with fp32 and int8 parity."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export import onnx_export
from export.onnx_export import ExportError, ImageEncoder
from train.encoders import TINY_CLIP, OpenClipImageConfig, OpenClipTextConfig, build_encoder

TEXTS = ["a red round shoe", "", "Blue cotton T-shirt, size M. " * 8, "café ünïcode ✓"]


def _head(dim_in: int, dim_out: int = 16) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(dim_in, dim_out)


def test_open_clip_text_encoder_exports_with_fixed_length(tmp_path):
    tower = build_encoder(OpenClipTextConfig(model=TINY_CLIP, init_seed=0))
    metrics, vectors, kind, names = onnx_export.export_text(
        tower, _head(tower.out_dim), TEXTS, TEXTS, tmp_path, "int8", "legacy")
    assert (kind, names) == ("clip", ["input_ids"]) and vectors.shape == (4, 16)
    assert metrics["max_abs"] <= 1e-4 and metrics["int8_cos_min"] >= 0.99
    graph = onnx.load(str(tmp_path / "text_encoder.onnx")).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 32] and [o.name for o in graph.output] == ["text_vec"]
    assert (tmp_path / "tokenizer.json").is_file()
    assert not list(tmp_path.glob("*.data"))


def test_dynamo_failure_falls_back_to_legacy(tmp_path, monkeypatch):
    tower = build_encoder(OpenClipImageConfig(model=TINY_CLIP, init_seed=0))
    encoder = ImageEncoder(tower, _head(tower.out_dim)).eval()
    real = onnx_export._export_once

    def flaky(encoder, args, path, axes, max_len, exporter):
        if exporter == "dynamo":
            raise RuntimeError("simulated dynamo failure")
        return real(encoder, args, path, axes, max_len, exporter)

    monkeypatch.setattr(onnx_export, "_export_once", flaky)
    path = tmp_path / "image_encoder.onnx"
    example = (torch.zeros(2, 3, 64, 64),)
    assert onnx_export.export_encoder(encoder, example, path, {0: "batch"}) == "legacy"
    session = onnx_export.session(path)
    images = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = encoder(torch.from_numpy(images)).numpy()
    assert np.abs(session.run(None, {"image": images})[0] - expected).max() <= 1e-4
    monkeypatch.setattr(onnx_export, "_export_once", lambda *a: (_ for _ in ()).throw(
        RuntimeError("both fail")))
    with pytest.raises(ExportError, match="could not export"):
        onnx_export.export_encoder(encoder, example, path, {0: "batch"})
    assert not path.exists()



def test_cnn_lora_exports_merged_with_fp32_and_int8_parity(tmp_path):
    """The pretrained EfficientNet-Lite0 tower (64 px for speed) with stage-2 LoRA on its 1x1 convs,
    moved off the identity, exports merged (no peft layer in the graph) through the same exporter:
    fp32 parity to the adapters as trained on the serving path (preprocess.json + Pillow/numpy),
    int8 cosine >= 0.99."""
    from PIL import Image

    from export.tuned import Tuning, deployable
    from train.encoders import TimmCnnConfig
    from train.encoders.peft_methods import LoraMethodConfig, apply_peft

    tuned = apply_peft(build_encoder(TimmCnnConfig(image_size=64)), LoraMethodConfig(r=4))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    merged = deployable(tuned, Tuning("lora", ("image",)))
    assert not any("lora" in k for k in merged.state_dict())
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in [(138, 92), (64, 64), (50, 300)]] + [None]
    metrics, vectors = onnx_export.export_image(merged, _head(tuned.out_dim), images, tmp_path,
                                                "int8", "dynamo", reference=tuned)
    assert vectors.shape == (4, 16) and metrics["dynamo"] == 1.0
    assert metrics["max_abs"] <= 1e-4 and metrics["int8_cos_min"] >= 0.99
    spec = json.loads((tmp_path / "preprocess.json").read_text())
    assert spec["size"] == [64, 64] and spec["mean"] == spec["std"] == [0.5, 0.5, 0.5]
    graph = onnx.load(str(tmp_path / "image_encoder.onnx")).graph
    assert [i.name for i in graph.input] == ["image"] and any(n.op_type == "Conv" for n in graph.node)
    with torch.no_grad():
        x = tuned.prepare(images[:3])
        assert (tuned(x) - build_encoder(TimmCnnConfig(image_size=64))(x)).abs().max() > 1e-3
