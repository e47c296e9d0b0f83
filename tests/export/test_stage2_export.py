"""Exporting stage-2 runs: tuned towers in the ONNX graph, stage-2 vectors, parity, refusals."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from pydantic import ValidationError
from tokenizers import Tokenizer
from torch import nn

from export import ExportError, export_run, onnx_export, tuned
from train.run import BEST, CONFIG, STAGE1_CONFIG, STAGE2, load_run
from export.__main__ import main as export_main
from export.tokenizer import encode_texts
from index import ann
from index.bundle import (IMAGE_ENCODER, ITEMS_INDEX, PREPROCESS, TEXT_ENCODER, TOKENIZER,
                          USER_IDS, USERS, list_versions, load_bundle)
from index.manifest import EncoderSpec
from serve.model import ServingModel
from train import checkpoint
from train.coldstart import hold_out_items
from train.config import TrainConfig, load_config
from train.data import load_dataset
from train.encoders import build_encoder
from train.encoders.base import Tower
from train.encoders.preprocess import PreprocessSpec, preprocess_images
from train.stage1 import run_stage1
from train.config import Stage2Config
from train.modules import build_towers
from train.stage2 import run_stage2
from train.synthetic import generate

METHODS = {"prompt": {"name": "prompt", "n_ctx": 2, "depth": 2}, "lora": {"name": "lora", "r": 4},
           "ia3": {"name": "ia3"}}
CPU = torch.device("cpu")


def stage2_config(method: dict, modalities: list[str]) -> Stage2Config:
    """One short epoch with a large enough step that the tuned towers move visibly (the loaded
    stage-1 state is not kept as a candidate, so best.pt is the tuned epoch)."""
    return Stage2Config.model_validate({
        "method": method, "modalities": modalities, "kt_batch_size": 16,
        "kt_steps_per_epoch": 2, "epochs": 1, "learning_rate": 1e-2, "keep_start": False})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data"), n_users=60, n_items=50, seed=0)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, data_dir) -> Path:
    """Tiny open_clip image and text towers, a feature-table backbone, heads, cold start."""
    root = tmp_path_factory.mktemp("s1")
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data_dir)},
        "encoders": {"image": {"name": "openclip_image", "model": "ptmrec-tiny", "init_seed": 0},
                     "text": {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0},
                     "cache_dir": str(root / "cache")},
        "backbone": {"name": "lightgcn_mm"}, "heads": {}, "cold_start": {"holdout_fraction": 0.2},
        "optim": {"batch_size": 256, "epochs": 2}, "eval": {"ks": [10, 20]}})
    run_stage1(cfg, root / "run", CPU)
    return root / "run"


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory, stage1_run):
    """method name -> its stage-2 run directory (trained once per module)."""
    runs: dict[str, Path] = {}

    def make(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp(f"s2_{method}")
            run_stage2(stage1_run, stage2_config(METHODS[method], ["image", "text"]), out, CPU)
            runs[method] = out
        return runs[method]

    return make


@pytest.fixture(scope="module", params=sorted(METHODS))
def exported(request, stage2_run, tmp_path_factory) -> tuple[str, Path, Path]:
    """(method, stage-2 run, its bundle)."""
    run = stage2_run(request.param)
    bundle = export_run(run, tmp_path_factory.mktemp("bundles"), exporter="legacy",
                        parity_items=16)
    return request.param, run, bundle


def reference(run: Path) -> tuple[dict[str, Tower], dict[str, nn.Linear]]:
    """The tuned towers and the heads rebuilt from best.pt without the exporter's code."""
    cfg = load_config(run / STAGE1_CONFIG)
    s2 = Stage2Config.model_validate(yaml.safe_load((run / STAGE2).read_text()))
    state = checkpoint.load(run / BEST)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    towers = build_towers(cfg.encoders, s2)
    for m, tower in towers.items():
        tower.load_state_dict(part(f"towers.{m}."))
        tower.eval()
    heads = {}
    for m in {k.split(".")[2] for k in state if k.startswith("heads.heads.")}:
        weights = part(f"heads.heads.{m}.")
        heads[m] = nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
        heads[m].load_state_dict(weights)
    return towers, heads


def torch_vectors(tower: Tower, head: nn.Module, raw: list) -> np.ndarray:
    """head(tower(raw)) with the training preparation, (n, d)."""
    with torch.no_grad():
        return head(tower(tower.prepare_counted(raw)[0])).numpy()


def onnx_vectors(bundle: Path, modality: str, raw: list) -> np.ndarray:
    """The bundle's ONNX tower on the serving preparation (preprocess.json / tokenizer.json)."""
    if modality == "image":
        spec = PreprocessSpec.model_validate_json((bundle / PREPROCESS).read_text())
        feeds = {"image": preprocess_images(raw, spec)[0]}
    else:
        names = load_bundle(bundle).manifest.encoder.text_inputs
        feeds = encode_texts(Tokenizer.from_file(str(bundle / TOKENIZER)), raw, names)
    name = IMAGE_ENCODER if modality == "image" else TEXT_ENCODER
    session = ort.InferenceSession(str(bundle / name), providers=["CPUExecutionProvider"])
    return session.run([f"{modality}_vec"], feeds)[0]


def raw_items(data_dir: Path, modality: str, n: int = 6) -> list:
    """n items' content, a missing one first, then texts of varied length or images."""
    items = load_dataset(data_dir).items
    values = items.images if modality == "image" else items.texts
    return [v for v in values if not v][:1] + [v for v in values if v][:n - 1]


def test_manifest_records_the_tuning(exported, stage1_run):
    method, run, bundle = exported
    m = load_bundle(bundle).manifest
    enc = m.encoder
    assert enc.encoder_tuning == method and enc.tuned_modalities == ["image", "text"]
    prompted = method == "prompt"
    assert (enc.n_ctx, enc.prompt_depth) == ((2, 2) if prompted else (0, 0))
    assert enc.tokenizer == "clip" and enc.context_length == (30 if prompted else 32)
    assert m.source_run == str(run.resolve()) and m.counts.cold_start
    assert m.config_hash != load_config(stage1_run / CONFIG).config_hash()
    assert m.metrics["parity.image.max_abs"] <= 1e-4 and m.metrics["parity.text.max_abs"] <= 1e-4
    assert m.metrics["trainable_share"] > 0  # stage-2 metrics.json


def test_vectors_come_from_the_stage2_weights(exported, stage1_run, data_dir):
    method, run, bundle = exported
    rebuilt = load_run(run)
    state, before = checkpoint.load(run / BEST), checkpoint.load(stage1_run / BEST)
    for name, value in rebuilt.model.state_dict().items():
        assert torch.equal(value, state[f"backbone.{name}"]), name
    assert not torch.equal(state["backbone.user"], before["backbone.user"])  # stage 2 trained
    with torch.no_grad():
        users = rebuilt.model.user_embeddings().numpy()
    np.testing.assert_allclose(np.load(bundle / USERS), users[np.load(bundle / USER_IDS)],
                               atol=1e-6)
    towers, heads = reference(run)
    cold = hold_out_items(load_dataset(data_dir), 0.2, seed=0)[1].items
    items = load_dataset(data_dir).items
    raw = {"image": [items.images[i] for i in cold], "text": [items.texts[i] for i in cold]}
    expected = np.mean([torch_vectors(towers[m], heads[m], raw[m]) for m in towers], axis=0)
    index = ann.load(bundle / ITEMS_INDEX)
    stored = np.stack([index.reconstruct(int(i)) for i in cold])  # IDMap2: by item id
    np.testing.assert_allclose(stored, expected, atol=1e-5)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_onnx_equals_the_tuned_towers_not_the_frozen_ones(exported, data_dir, modality):
    method, run, bundle = exported
    towers, heads = reference(run)
    raw = raw_items(data_dir, modality)
    got = onnx_vectors(bundle, modality, raw)
    assert np.abs(got - torch_vectors(towers[modality], heads[modality], raw)).max() <= 1e-4
    frozen = build_encoder(getattr(load_config(run / STAGE1_CONFIG).encoders, modality))
    assert np.abs(got - torch_vectors(frozen, heads[modality], raw)).max() > 1e-3


def test_serve_loads_and_encodes_with_the_tuned_towers(exported, data_dir):
    method, run, bundle = exported
    model = ServingModel.from_bundle(load_bundle(bundle))
    model.smoke()
    items = load_dataset(data_dir).items
    i = next(j for j, (t, p) in enumerate(zip(items.texts, items.images)) if t and p)
    towers, heads = reference(run)
    expected = np.mean([torch_vectors(towers["image"], heads["image"], [items.images[i]]),
                        torch_vectors(towers["text"], heads["text"], [items.texts[i]])], axis=0)
    got = model.encode(Path(items.images[i]).read_bytes(), items.texts[i])
    assert np.abs(got - expected[0]).max() <= 1e-4


def _refused(run: Path, bundles: Path) -> None:
    """The export of `run` fails its parity check through the API and the CLI, leaving nothing."""
    with pytest.raises(ExportError, match="differs from torch"):
        export_run(run, bundles, publish_bundle=True, exporter="legacy", parity_items=8)
    assert export_main(["--run", str(run), "--bundles", str(bundles), "--publish",
                        "--exporter", "legacy", "--parity-items", "8"]) == 1
    assert list_versions(bundles) == [] and not list(bundles.iterdir())  # nothing published


def test_wrong_prompts_in_the_graph_refuse_the_export(stage2_run, tmp_path, monkeypatch):
    real = onnx_export.export_encoder

    def corrupted(encoder, *args, **kwargs):
        """Export with perturbed prompts, then put the trained ones back (torch keeps them).
        Random noise, not a constant: the towers layer-normalise every token."""
        prompts = encoder.tower.token_hook.prompts
        kept = prompts.detach().clone()
        with torch.no_grad():
            prompts.add_(torch.randn(prompts.shape, generator=torch.Generator().manual_seed(0)))
        try:
            return real(encoder, *args, **kwargs)
        finally:
            with torch.no_grad():
                prompts.copy_(kept)

    monkeypatch.setattr(onnx_export, "export_encoder", corrupted)
    _refused(stage2_run("prompt"), tmp_path / "bundles")


def test_unmerged_adapters_refuse_the_export(stage2_run, tmp_path, monkeypatch):
    def drop_adapters(tower: Tower) -> Tower:
        """A broken merge: the base layers come back without the LoRA deltas."""
        for name, module in list(tower.named_modules()):
            if hasattr(module, "get_base_layer") and name.endswith(("c_fc", "c_proj")):
                parent, _, child = name.rpartition(".")
                setattr(tower.get_submodule(parent), child, module.get_base_layer())
        return tower

    monkeypatch.setattr(tuned, "merge_peft", drop_adapters)
    _refused(stage2_run("lora"), tmp_path / "bundles")


def test_older_stage2_run_needs_its_stage1_run(stage2_run, stage1_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(stage2_run("prompt"), old)
    (old / STAGE1_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match="--stage1-run"):
        load_run(old)
    bundles = tmp_path / "bundles"
    assert export_main(["--run", str(old), "--bundles", str(bundles)]) == 2
    assert export_main(["--run", str(old), "--bundles", str(bundles), "--exporter", "legacy",
                        "--parity-items", "8", "--stage1-run", str(stage1_run)]) == 0
    assert load_bundle(bundles / "v1").manifest.encoder.encoder_tuning == "prompt"


def test_minilm_prompts_export_with_dynamic_length(data_dir, tmp_path):
    """BERT prompts after [CLS] extend the attention mask; the dynamo graph keeps them."""
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data_dir)},
        "encoders": {"text": {"name": "minilm", "max_seq_length": 32},
                     "cache_dir": str(tmp_path / "cache")},
        "backbone": {"name": "lightgcn", "embedding_size": 16, "n_layers": 1},
        "heads": {"modalities": ["text"]}, "cold_start": {"holdout_fraction": 0.2},
        "optim": {"batch_size": 256, "epochs": 1}, "eval": {"ks": [10, 20]}})
    run_stage1(cfg, tmp_path / "s1", CPU)
    s2 = stage2_config({"name": "prompt", "n_ctx": 2, "depth": 3}, ["text"])
    run_stage2(tmp_path / "s1", s2, tmp_path / "s2", CPU)
    bundle = export_run(tmp_path / "s2", tmp_path / "bundles", exporter="dynamo",
                        parity_items=12)
    enc = load_bundle(bundle).manifest.encoder
    assert (enc.encoder_tuning, enc.tuned_modalities, enc.tokenizer) == ("prompt", ["text"],
                                                                         "bert")
    assert enc.text_padding == "longest" and enc.image_encoder is None
    towers, heads = reference(tmp_path / "s2")
    raw = raw_items(data_dir, "text") + ["short", "a much longer text " * 6]
    got = onnx_vectors(bundle, "text", raw)
    assert np.abs(got - torch_vectors(towers["text"], heads["text"], raw)).max() <= 1e-4
    frozen = build_encoder(cfg.encoders.text)
    assert np.abs(got - torch_vectors(frozen, heads["text"], raw)).max() > 1e-3


def test_int8_export_of_prompted_towers(stage2_run, data_dir, tmp_path):
    run = stage2_run("prompt")
    bundle = export_run(run, tmp_path / "bundles", quantize="int8", exporter="legacy",
                        parity_items=12)
    m = load_bundle(bundle).manifest
    assert m.encoder.encoder_tuning == "prompt" and m.encoder.text_quantization != "none"
    towers, heads = reference(run)
    for modality in ("image", "text"):
        assert m.metrics[f"parity.{modality}.int8_cos_min"] >= 0.99
        raw = raw_items(data_dir, modality)
        cos = onnx_export.cosines(onnx_vectors(bundle, modality, raw),
                                  torch_vectors(towers[modality], heads[modality], raw))
        assert cos.min() >= 0.99


def test_manifest_tuning_fields_are_backwards_compatible():
    old = {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "context_length": 32,
           "tokenizer": "clip"}  # an EncoderSpec written before the stage-2 fields existed
    spec = EncoderSpec.model_validate(old)
    assert (spec.encoder_tuning, spec.tuned_modalities, spec.n_ctx) == ("none", [], 0)
    tuned_spec = EncoderSpec.model_validate(old | {"encoder_tuning": "lora",
                                                   "tuned_modalities": ["text"]})
    assert tuned_spec.tuned_modalities == ["text"]
    for bad in ({"encoder_tuning": "lora"}, {"tuned_modalities": ["image"]},
                {"encoder_tuning": "adapter", "tuned_modalities": ["image"]}):
        with pytest.raises(ValidationError):
            EncoderSpec.model_validate(old | bad)
