"""Stage 2 on a tiny synthetic run: prompts/LoRA/IA3 train on the KT loss (or, ablation, on BPR),
metrics are written."""
from __future__ import annotations

import json

import pytest
import torch

from train import checkpoint
from train.config import TrainConfig, load_config
from train.data import load_dataset
from train.heads import ContentHeads, HeadsConfig
from train.sampling import NegativeSampler, epoch_batches
from train.stage1 import run_stage1
from train.config import Stage2Config
from train.modules import build_towers
from train.stage2 import below_start, main, param_groups, run_stage2
from train.synthetic import generate
from train.tuning import TUNING_LOSSES, encode
from train.run import BEST, CHECKPOINT, CONFIG, METRICS


def _stage1(root, heads: bool):
    data = generate(root / "data", n_users=60, n_items=50, seed=0)
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)},
        "encoders": {"image": {"name": "openclip_image", "model": "ptmrec-tiny", "init_seed": 0},
                     "text": {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0},
                     "cache_dir": str(root / "cache")},
        "backbone": {"name": "lightgcn_mm"}, "heads": {} if heads else None,
        "cold_start": {"holdout_fraction": 0.2},
        "optim": {"batch_size": 256, "epochs": 2}, "eval": {"ks": [10, 20]}})
    run_stage1(cfg, root / "run", torch.device("cpu"))
    return root / "run"


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    return _stage1(tmp_path_factory.mktemp("s2"), heads=True)


@pytest.mark.parametrize("method", [{"name": "prompt", "n_ctx": 2, "depth": 2}, {"name": "lora"},
                                    {"name": "ia3"}])
def test_stage2_methods(stage1_run, tmp_path, method):
    s2 = Stage2Config.model_validate({"method": method, "kt_batch_size": 16,
                                      "kt_steps_per_epoch": 2, "epochs": 2, "patience": 5})
    metrics = run_stage2(stage1_run, s2, tmp_path, torch.device("cpu"))
    assert {"valid", "test", "cold_start", "best_epoch", "trainable_share"} <= set(metrics)
    assert 0 < metrics["trainable_encoder_params"] < metrics["encoder_params"]
    state = checkpoint.load(tmp_path / BEST)
    tuned = [k for k in state if k.startswith("towers.") and
             any(s in k for s in ("prompts", "lora_", "ia3_"))]
    assert tuned, "the method's parameters are saved with the best weights"


def test_prompts_move_under_kt(stage1_run, tmp_path):
    s2 = Stage2Config.model_validate({"method": {"name": "prompt", "n_ctx": 2, "depth": 2},
                                      "kt_batch_size": 16, "kt_steps_per_epoch": 3, "epochs": 1,
                                      "keep_start": False})
    start = build_towers(load_config(stage1_run / CONFIG).encoders, s2)
    run_stage2(stage1_run, s2, tmp_path / "a", torch.device("cpu"))
    state = checkpoint.load(tmp_path / "a" / BEST)
    prompts = {k: v for k, v in state.items() if k.endswith("prompts")}
    initial = {f"towers.{m}.{k}": v for m, t in start.items()
               for k, v in t.state_dict().items() if k.endswith("prompts")}
    assert prompts and prompts.keys() == initial.keys()
    assert all(not torch.equal(prompts[k], initial[k]) for k in prompts)


def test_start_state_reproduces_stage1_and_is_kept(stage1_run, tmp_path):
    """Loading is exact (the start validates like stage 1's best epoch) and, with nothing
    learned (learning rate 0, an identity-initialised method), no epoch beats it: best_epoch -1."""
    s2 = Stage2Config.model_validate({"method": {"name": "ia3"}, "kt_batch_size": 16,
                                      "kt_steps_per_epoch": 1, "epochs": 2, "patience": 5,
                                      "learning_rate": 0.0})
    metrics = run_stage2(stage1_run, s2, tmp_path, torch.device("cpu"))
    stage1 = json.loads((stage1_run / METRICS).read_text())
    assert metrics["start_valid"] == pytest.approx(stage1["valid"], abs=1e-6)
    assert metrics["best_epoch"] == -1 and metrics["epochs_run"] == 2
    assert metrics["test"] == pytest.approx(stage1["test"], abs=1e-6)
    assert (tmp_path / BEST).exists()


def test_start_state_without_heads_is_not_kept(tmp_path):
    """A stage-1 run without content heads has no cold-start encoder: its state is validated but
    does not compete, so the exported stage-2 run always has trained heads."""
    run = _stage1(tmp_path, heads=False)
    s2 = Stage2Config.model_validate({"method": {"name": "ia3"}, "kt_batch_size": 16,
                                      "kt_steps_per_epoch": 1, "epochs": 1, "learning_rate": 0.0})
    metrics = run_stage2(run, s2, tmp_path / "s2", torch.device("cpu"))
    assert metrics["start_valid"] is not None and metrics["best_epoch"] == 0
    # nothing moved (lr 0, IA3 starts as the identity): validation equals the start, no warning
    metric = "recall@20"
    assert below_start(metrics["start_valid"], metrics["valid"][metric], metric) is None


def test_below_start_names_both_figures():
    start = {"recall@20": 0.1030}
    assert below_start(None, 0.05, "recall@20") is None  # joint training: no start state
    assert below_start(start, 0.1030, "recall@20") is None
    assert below_start(start, 0.1031, "recall@20") is None
    why = below_start(start, 0.0978, "recall@20")
    assert "recall@20 0.0978 < 0.1030" in why


def test_cli_and_missing_encoders(stage1_run, tmp_path, capsys):
    assert main(["--run", str(stage1_run), "--out", str(tmp_path / "o"),
                 "--set", "epochs=1", "--set", "kt_steps_per_epoch=1", "--set", "kt_batch_size=8",
                 "--set", "modalities=[text]"]) == 0
    assert "stage 2 (prompt" in capsys.readouterr().out


def _tuning_setup(stage1_run, s2: Stage2Config):
    """Towers, heads, raw items, detached targets and one batch of a stage-1 run."""
    cfg = load_config(stage1_run / CONFIG)
    dataset = load_dataset(cfg.data.path)
    towers = build_towers(cfg.encoders, s2)
    heads = ContentHeads(HeadsConfig(modalities=s2.modalities),
                         {m: t.out_dim for m, t in towers.items()}, 8)
    raw = {"image": dataset.items.images, "text": dataset.items.texts}
    g = torch.Generator().manual_seed(0)
    targets = (torch.randn(dataset.n_users, 8, generator=g),
               torch.randn(dataset.n_items, 8, generator=g))
    sampler = NegativeSampler(dataset.train, dataset.n_items)
    batch = next(epoch_batches(torch.from_numpy(dataset.train), sampler, 64, g))
    return towers, heads, raw, targets, batch


@pytest.mark.parametrize("tuning_loss", ["kt", "bpr"])
def test_tuning_losses_reach_the_prompts(stage1_run, tuning_loss):
    s2 = Stage2Config.model_validate({"method": {"name": "prompt", "n_ctx": 2, "depth": 2},
                                      "modalities": ["text"], "kt_batch_size": 16,
                                      "tuning_loss": tuning_loss})
    towers, heads, raw, targets, batch = _tuning_setup(stage1_run, s2)
    loss = TUNING_LOSSES[tuning_loss](heads, towers, raw, targets, batch, s2, torch.device("cpu"))
    assert loss.item() > 0
    loss.backward()
    prompts = towers["text"].token_hook.prompts
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert heads.heads["text"].weight.grad.abs().sum() > 0
    assert targets[0].grad is None  # the users are detached targets


def test_encode_keeps_input_order(stage1_run):
    s2 = Stage2Config.model_validate({"modalities": ["text"]})
    towers, _, raw, _, _ = _tuning_setup(stage1_run, s2)
    tower, texts = towers["text"].eval(), raw["text"][:12]
    batched = encode(tower, texts, 5, torch.device("cpu"), grad=False)
    one_by_one = torch.cat([encode(tower, [t], 1, torch.device("cpu"), grad=False) for t in texts])
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=1e-4)


def test_two_stages_without_kt_run(stage1_run, tmp_path):
    base = {"method": {"name": "prompt", "n_ctx": 2, "depth": 2}, "tuning_loss": "bpr",
            "kt_batch_size": 16, "kt_steps_per_epoch": 2, "epochs": 2, "refresh_every": 2,
            "keep_start": False}
    prompts = {}
    for name, weight in (("bpr", 1.0), ("off", 0.0)):
        s2 = Stage2Config.model_validate(base | {"kt_weight": weight})
        metrics = run_stage2(stage1_run, s2, tmp_path / name, torch.device("cpu"))
        assert metrics["tuning_loss"] == "bpr" and len(metrics["valid_curve"]) == 2
        state = checkpoint.load(tmp_path / name / BEST)
        prompts[name] = [v for k, v in sorted(state.items()) if k.endswith("prompts")]
    assert prompts["bpr"] and len(prompts["bpr"]) == len(prompts["off"])
    # same seed, same initial prompts: only the BPR tuning loss moves them
    assert all(not torch.equal(a, b) for a, b in zip(prompts["bpr"], prompts["off"]))


def test_cpu_budget_options(stage1_run, tmp_path):
    """No initial re-encoding, bf16 on CPU, a separate learning rate for what the tuning trains."""
    s2 = Stage2Config.model_validate({"method": {"name": "ia3"}, "modalities": ["text"],
                                      "kt_batch_size": 16, "kt_steps_per_epoch": 1, "epochs": 1,
                                      "refresh_at_start": False, "cpu_bf16": True,
                                      "learning_rate": 1e-3, "tuning_learning_rate": 1e-2})
    metrics = run_stage2(stage1_run, s2, tmp_path, torch.device("cpu"))
    assert metrics["epochs_run"] == 1 and metrics["trainable_encoder_params"] > 0
    towers = torch.nn.ModuleDict(build_towers(load_config(stage1_run / CONFIG).encoders, s2))
    heads = ContentHeads(HeadsConfig(modalities=["text"]), {"text": towers["text"].out_dim}, 4)
    modules = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2), "heads": heads,
                                   "towers": towers})
    rest, tuned = param_groups(modules, s2)
    assert len(rest["params"]) == 2 and tuned["lr"] == 1e-2
    head_params = sum(p.numel() for p in heads.parameters())
    assert sum(p.numel() for p in tuned["params"]) == (metrics["trainable_encoder_params"]
                                                       + head_params)


def test_stage1_adam_moments_are_restored(stage1_run, tmp_path, monkeypatch):
    """The backbone and heads continue from stage 1's Adam moments, matched by parameter name."""
    from train import stage2

    saved = checkpoint.load(stage1_run / CHECKPOINT)["optimizer"]["state"]
    checked = []

    def spy(optimizer, modules, run, had_heads):
        n = restore(optimizer, modules, run, had_heads)
        stage1 = torch.nn.ModuleDict({"backbone": modules["backbone"], "heads": modules["heads"]})
        for i, (name, param) in enumerate(stage1.named_parameters()):
            if i in saved and param.requires_grad:
                torch.testing.assert_close(optimizer.state[param]["exp_avg_sq"],
                                           saved[i]["exp_avg_sq"], msg=name)
                checked.append(name)
        assert not any(p in optimizer.state for p in modules["towers"].parameters())
        assert n == len(checked)
        return n

    restore = stage2.restore_stage1_moments
    monkeypatch.setattr(stage2, "restore_stage1_moments", spy)
    s2 = Stage2Config.model_validate({"method": {"name": "ia3"}, "kt_batch_size": 16,
                                      "kt_steps_per_epoch": 1, "epochs": 1})
    run_stage2(stage1_run, s2, tmp_path, torch.device("cpu"))
    assert any(n.startswith("backbone.") for n in checked)
    assert any(n.startswith("heads.") for n in checked)


@pytest.mark.parametrize("dropout", [False, True])
def test_tower_dropout_switch(dropout):
    """tower_dropout false: the tuned MiniLM runs without its dropout (two encodings of the same
    items agree) and its LoRA parameters still get gradients; true: dropout is active."""
    from train.encoders import MiniLMConfig
    from train.features import EncodersConfig
    from train.tuning import head_vectors

    s2 = Stage2Config.model_validate({"method": {"name": "lora", "r": 4}, "modalities": ["text"],
                                      "tower_dropout": dropout, "encode_batch_size": 4})
    tower = build_towers(EncodersConfig(text=MiniLMConfig(max_seq_length=16)), s2)["text"]
    heads = ContentHeads(HeadsConfig(modalities=["text"]), {"text": tower.out_dim}, 8)
    raw = {"text": ["a red round shoe", "blue cotton shirt, size M", "green lamp"]}
    items = torch.tensor([0, 2, 1, 0])
    torch.manual_seed(0)
    first = head_vectors(heads, tower, "text", raw, items, s2, torch.device("cpu"))
    second = head_vectors(heads, tower, "text", raw, items, s2, torch.device("cpu"))
    assert torch.equal(first[0], first[3])  # each distinct item encoded once
    assert torch.equal(first, second) != dropout
    second.sum().backward()
    lora = [p for n, p in tower.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)


def test_lora_dropout_needs_tower_dropout():
    with pytest.raises(ValueError, match="tower_dropout"):
        Stage2Config.model_validate({"method": {"name": "lora", "dropout": 0.1}})
    assert Stage2Config.model_validate({"method": {"name": "lora", "dropout": 0.1},
                                        "tower_dropout": True}).encode.tower_dropout


def test_heads_are_calibrated_again_after_stage2(tmp_path):
    """A stage-1 config with heads.calibrate gets its heads calibrated again on the tuned
    features; recalibrate: false keeps the KT-tuned heads."""
    data = generate(tmp_path / "data", n_users=60, n_items=50, seed=0)
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)},
        "encoders": {"text": {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0},
                     "cache_dir": str(tmp_path / "cache")},
        "backbone": {"name": "lightgcn", "embedding_size": 16, "n_layers": 1},
        "heads": {"modalities": ["text"], "rank_weight": 1.0,
                  "calibrate": {"epochs": 3, "valid_fraction": 0.2}},
        "cold_start": {"holdout_fraction": 0.2},
        "optim": {"batch_size": 256, "epochs": 2}, "eval": {"ks": [10, 20]}})
    run_stage1(cfg, tmp_path / "run", torch.device("cpu"))
    settings = {"method": {"name": "prompt", "n_ctx": 2, "depth": 2}, "modalities": ["text"],
                "kt_batch_size": 16, "kt_steps_per_epoch": 2, "epochs": 1, "keep_start": False}
    again = run_stage2(tmp_path / "run", Stage2Config.model_validate(settings), tmp_path / "a",
                       torch.device("cpu"))
    as_tuned = run_stage2(tmp_path / "run", Stage2Config.model_validate(
        settings | {"recalibrate": False}), tmp_path / "b", torch.device("cpu"))
    assert again["heads_calibration"]["withheld_items"] > 0 and "heads_calibration" not in as_tuned
    assert again["test"] == as_tuned["test"]  # the backbone is the same best state
    heads = [checkpoint.load(tmp_path / d / BEST)["heads.heads.text.weight"] for d in "ab"]
    assert not torch.equal(*heads)
    assert again["cold_start"]["heads"] != as_tuned["cold_start"]["heads"]


def test_stage2_lora_on_the_cnn_tower_and_prompts_refused(tmp_path):
    """Stage 2 on the EfficientNet-Lite0 tower (64 px): LoRA on its 1x1 convs trains under KT;
    prompts on it fail at config time, before any feature is extracted."""
    data = generate(tmp_path / "data", n_users=40, n_items=30, seed=0)
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)},
        "encoders": {"image": {"name": "timm_cnn", "image_size": 64},
                     "cache_dir": str(tmp_path / "cache")},
        "backbone": {"name": "lightgcn_mm", "modalities": ["image"]},
        "heads": {"modalities": ["image"]},
        "optim": {"batch_size": 256, "epochs": 1}, "eval": {"ks": [10, 20]}})
    run_stage1(cfg, tmp_path / "run", torch.device("cpu"))
    prompts = Stage2Config.model_validate({"modalities": ["image"]})
    with pytest.raises(ValueError, match="ViT/transformer-only; use method lora or ia3"):
        run_stage2(tmp_path / "run", prompts, tmp_path / "p", torch.device("cpu"))
    assert not (tmp_path / "p").exists()
    s2 = Stage2Config.model_validate({"method": {"name": "lora", "r": 2}, "modalities": ["image"],
                                      "kt_batch_size": 8, "kt_steps_per_epoch": 1, "epochs": 1,
                                      "keep_start": False})
    metrics = run_stage2(tmp_path / "run", s2, tmp_path / "s2", torch.device("cpu"))
    assert 0 < metrics["trainable_share"] < 0.1 and metrics["method"] == "lora"
    state = checkpoint.load(tmp_path / "s2" / "best.pt")
    assert any(k.startswith("towers.image.") and ".lora_B." in k for k in state)
