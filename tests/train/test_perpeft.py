"""PerPEFT on the tiny synthetic stage-1 run: user groups, per-group prompts and heads, grouped
scoring as one dot product, group-specific negatives."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from train import checkpoint, perpeft
from train.backbones import build_backbone
from train.config import load_config
from train.data import load_dataset
from train.heads import ContentHeads, HeadsConfig
from train.sampling import Batch
from train.modules import backbone_inputs
from train.config import Stage2Config
from train.modules import build_towers
from train.stage2 import run_stage2
from tests.train.test_stage2 import _stage1
from train.run import BEST, CHECKPOINT, CONFIG, METRICS

PROMPTS = {"name": "prompt", "n_ctx": 2, "depth": 2}


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    return _stage1(tmp_path_factory.mktemp("perpeft"), heads=True)



def _with(s2: Stage2Config, **flat) -> Stage2Config:
    """s2 with some settings changed, given by their flat stage-2 keys."""
    return Stage2Config.model_validate(s2.model_dump() | flat)

def test_cluster_users_finds_separated_groups():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    truth = rng.integers(0, 3, 90)
    users = torch.from_numpy(centres[truth] + rng.normal(0, 0.1, (90, 3))).float()
    groups = perpeft.cluster_users(users, 3, seed=0)
    assert groups.shape == (90,) and set(groups.tolist()) == {0, 1, 2}
    # the same partition up to relabelling
    pairs = {(int(t), int(g)) for t, g in zip(truth, groups)}
    assert len(pairs) == 3
    assert torch.equal(groups, perpeft.cluster_users(users, 3, seed=0))
    with pytest.raises(ValueError, match="groups for 2 users"):
        perpeft.cluster_users(users[:2], 3, seed=0)


def test_shared_copy_shares_frozen_weights_only(stage1_run):
    cfg = load_config(stage1_run / CONFIG)
    tower = build_towers(cfg.encoders, Stage2Config(method=PROMPTS, modalities=["text"]))["text"]
    grouped = perpeft.GroupedTower.copies(tower, 3)
    first, second = (dict(m.named_parameters()) for m in grouped.members[:2])
    for name, p in first.items():
        assert (second[name] is p) == (not p.requires_grad), name
    trainable = [n for n, p in first.items() if p.requires_grad]
    assert trainable and all("prompts" in n for n in trainable)
    # every member starts from the same prompts: the concatenation is G copies of one output
    prepared = tower.prepare(["a red round thing", "blue"])
    with torch.no_grad():
        out = grouped(prepared)
        assert out.shape == (2, 3 * tower.out_dim) == (2, grouped.out_dim)
        assert torch.allclose(out, tower(prepared).repeat(1, 3))
        grouped.members[1].token_hook.prompts.add_(1.0)
        perpeft.activate(grouped, 1)
        assert grouped.out_dim == tower.out_dim
        assert not torch.allclose(grouped(prepared), tower(prepared))
    # tokenisation, preprocessing and the hook are the first member's
    assert torch.equal(grouped.prepare(["blue"]), tower.prepare(["blue"]))
    assert grouped.token_hook is tower.token_hook
    tiled = perpeft.GroupedTower.tiled(tower, 3)
    with torch.no_grad():
        assert torch.equal(tiled(prepared), tower(prepared).repeat(1, 3))
    assert sum(1 for _ in tiled.parameters()) == sum(1 for _ in tower.parameters())


def _grouped_model(stage1_run, groups=3):
    cfg = load_config(stage1_run / CONFIG)
    dataset = load_dataset(cfg.data.path)
    inputs = backbone_inputs(dataset, torch.device("cpu"))
    inputs.features = {m: torch.randn(dataset.n_items, 8, generator=torch.Generator().manual_seed(1))
                       for m in ("image", "text")}
    model = build_backbone(cfg.backbone, inputs)
    assignment = torch.arange(dataset.n_users) % groups
    return model, perpeft.GroupedBackbone(model, assignment, groups), dataset


def test_grouped_scores_are_each_users_group_scores(stage1_run):
    """u_big · v_big = u^g · v^g: one inner product serves every group."""
    model, grouped, _ = _grouped_model(stage1_run)
    with torch.no_grad():
        grouped.features["text"][:, 8:16] += torch.randn_like(grouped.features["text"][:, 8:16])
        users, items = grouped.embeddings()
        assert users.shape[1] == items.shape[1] == 3 * model.user_embeddings().shape[1]
        scores = users @ items.T
        for g in range(3):
            perpeft.activate(grouped, g)
            u, i = grouped.embeddings()
            rows = grouped.groups == g
            assert torch.allclose(scores[rows], (u @ i.T)[rows], atol=1e-5)
        perpeft.activate(grouped, None)
        # group 0 still reads the stage-1 features: its scores are the ungrouped model's
        u0, i0 = model.embeddings()
        rows = grouped.groups == 0
        assert torch.allclose(scores[rows], (u0 @ i0.T)[rows], atol=1e-5)


def test_group_loss_trains_only_its_own_tables(stage1_run):
    """With trainable tables (as FREEDOM's), a group's step moves its tables only, also under
    Adam's momentum from earlier steps of other groups."""
    _, grouped, _ = _grouped_model(stage1_run)
    for table in grouped.tables:
        for param in table.values():
            param.requires_grad_(True)
    optimizer = torch.optim.Adam([p for t in grouped.tables for p in t.values()], lr=0.1)
    batch = {g: Batch(torch.nonzero(grouped.groups == g).squeeze(1)[:4],
                      torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])) for g in (0, 2)}
    with pytest.raises(RuntimeError, match="active group"):
        grouped.loss(batch[2])
    for g in (0, 2):
        before = [t["text"].detach().clone() for t in grouped.tables]
        optimizer.zero_grad(set_to_none=True)
        perpeft.activate(grouped, g)
        grouped.loss(batch[g]).backward()
        optimizer.step()
        moved = [not torch.equal(b, t["text"]) for b, t in zip(before, grouped.tables)]
        assert moved == [h == g for h in range(3)]
    assert not any(p.requires_grad for p in grouped.inner.features.values())


def test_group_samplers_draw_the_groups_own_items():
    train = np.array([[0, 0], [0, 1], [1, 2], [1, 3], [2, 0], [2, 6], [3, 4], [3, 5]])
    assignment = np.array([0, 1, 0, 1])
    samplers = perpeft.group_samplers(train, assignment, 8, 2, group_negatives=True)
    generator = torch.Generator().manual_seed(0)
    seen = {0: set(), 1: set()}
    for _ in range(20):
        for group, batch in perpeft.group_batches(samplers, 2, generator):
            assert set(assignment[batch.users.numpy()]) == {group}
            seen[group] |= set(batch.neg.tolist())
    assert seen[0] == {1, 6} and seen[1] <= {2, 3, 4, 5}
    everything = perpeft.group_samplers(train, assignment, 8, 2, group_negatives=False)
    assert set(everything[0][1].pool.tolist()) == set(range(7))
    # a user who trained on all but one, or all, of its group's items still gets negatives:
    # the group's own items while one is found within the rounds, else from all training items
    for keep in ([0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 6, 7]):
        samplers = perpeft.group_samplers(train[keep], assignment, 8, 2, True)
        users = torch.zeros(200, dtype=torch.long)  # user 0, group 0
        neg = samplers[0][1].sample(users, generator)
        assert not ({0, 1} & set(neg.tolist())) and set(neg.tolist()) <= set(range(7))


def test_perpeft_run_starts_exactly_at_stage1_and_tunes_groups_apart(stage1_run, tmp_path):
    """Loading is exact and, with nothing learned (lr 0, identity-initialised (IA)^3), the grouped
    model scores exactly as stage 1; trained, the groups' prompts and heads drift apart."""
    still = Stage2Config.model_validate({"method": {"name": "ia3"}, "groups": 3,
                                         "kt_batch_size": 16,
                                         "kt_steps_per_epoch": 1, "epochs": 1,
                                         "learning_rate": 0.0})
    metrics = run_stage2(stage1_run, still, tmp_path / "still", torch.device("cpu"))
    stage1 = json.loads((stage1_run / METRICS).read_text())
    assert metrics["start_valid"] == pytest.approx(stage1["valid"], abs=1e-6)
    assert metrics["best_epoch"] == -1 and metrics["test"] == pytest.approx(stage1["test"], abs=1e-6)
    assert metrics["groups"] == 3 and sum(metrics["group_sizes"]) == 60

    s2 = Stage2Config.model_validate({"method": PROMPTS, "groups": 3, "kt_batch_size": 16,
                                      "kt_steps_per_epoch": 6, "epochs": 1, "keep_start": False})
    metrics = run_stage2(stage1_run, s2, tmp_path / "tuned", torch.device("cpu"))
    state = checkpoint.load(tmp_path / "tuned" / BEST)
    prompts = [state[f"towers.image.members.{g}.token_hook.prompts"] for g in range(3)]
    assert not torch.equal(prompts[0], prompts[1]) and not torch.equal(prompts[1], prompts[2])
    heads = [state[f"heads.heads.text.members.{g}.weight"] for g in range(3)]
    assert not torch.equal(heads[0], heads[1])
    assert torch.equal(state["backbone.groups"].bincount(minlength=3),
                       torch.tensor(metrics["group_sizes"]))
    # trainable share counts the shared frozen base once and every group's prompts
    one = run_stage2(stage1_run, _with(s2, groups=1), tmp_path / "one",
                     torch.device("cpu"))
    assert metrics["trainable_encoder_params"] == 3 * one["trainable_encoder_params"]
    assert metrics["encoder_params"] == one["encoder_params"] + 2 * one["trainable_encoder_params"]


def test_groups_need_stage1():
    with pytest.raises(ValueError, match="from_stage1"):
        Stage2Config.model_validate({"groups": 2, "from_stage1": False})


def test_grouped_heads_fuse_blockwise():
    heads = ContentHeads(HeadsConfig(modalities=["image", "text"]), {"image": 4, "text": 6}, 5)
    reference = {m: h.weight.clone() for m, h in heads.heads.items()}
    perpeft.group_heads(heads, 2)
    assert torch.equal(heads.heads["image"].members[1].weight, reference["image"])
    feats = {"image": torch.randn(3, 4), "text": torch.randn(3, 6)}
    with torch.no_grad():
        heads.heads["text"].members[1].weight.mul_(2.0)
        blocks = {m: torch.cat([f, f + 1.0], dim=1) for m, f in feats.items()}
        fused = heads(blocks)
        assert fused.shape == (3, 10)
        for g in (0, 1):  # block g: the mean of each modality's group-g head on block g
            own = [heads.heads[m].members[g](blocks[m].chunk(2, dim=1)[g]) for m in feats]
            assert torch.allclose(fused[:, 5 * g:5 * (g + 1)], torch.stack(own).mean(0))
        with pytest.raises(ValueError, match="width 4, expected 2 group blocks of 4"):
            heads(feats)


def test_backbone_moments_restored_grouped_heads_start_fresh(stage1_run, tmp_path, monkeypatch):
    from train import stage2

    saved = checkpoint.load(stage1_run / CHECKPOINT)["optimizer"]["state"]
    seen = {}

    def spy(optimizer, modules, run, had_heads):
        n = restore(optimizer, modules, run, had_heads)
        inner = list(modules["backbone"].inner.parameters())
        seen["backbone"] = all(torch.equal(optimizer.state[p]["exp_avg_sq"], saved[i]["exp_avg_sq"])
                               for i, p in enumerate(inner) if p.requires_grad and i in saved)
        seen["heads"] = [p for p in modules["heads"].parameters() if p in optimizer.state]
        seen["n"] = n
        return n

    restore = stage2.restore_stage1_moments
    monkeypatch.setattr(stage2, "restore_stage1_moments", spy)
    s2 = Stage2Config.model_validate({"method": {"name": "ia3"}, "groups": 2, "kt_batch_size": 16,
                                      "kt_steps_per_epoch": 1, "epochs": 1})
    run_stage2(stage1_run, s2, tmp_path, torch.device("cpu"))
    assert seen["backbone"] and seen["n"] > 0 and seen["heads"] == []


def test_groups_start_from_a_global_tuning(stage1_run, tmp_path):
    """init_from: the global single-set run's state starts every group (PerPEFT's global ->
    per-group adapters), so the grouped start validates exactly like the global run."""
    settings = {"method": PROMPTS, "kt_batch_size": 16, "kt_steps_per_epoch": 3, "epochs": 1,
                "keep_start": False, "learning_rate": 1e-2}
    glob = run_stage2(stage1_run, Stage2Config.model_validate(settings), tmp_path / "global",
                      torch.device("cpu"))
    grouped = Stage2Config.model_validate(settings | {"groups": 2, "learning_rate": 0.0,
                                                      "init_from": str(tmp_path / "global")})
    metrics = run_stage2(stage1_run, grouped, tmp_path / "pp", torch.device("cpu"))
    assert metrics["start_valid"] == pytest.approx(glob["valid"], abs=1e-6)
    state, start = (checkpoint.load(tmp_path / d / BEST) for d in ("pp", "global"))
    assert torch.equal(state["towers.text.members.1.token_hook.prompts"],
                       start["towers.text.token_hook.prompts"])
    with pytest.raises(ValueError, match="this run tunes lora"):
        run_stage2(stage1_run, _with(grouped, method={"name": "lora"},
                                          init_from=tmp_path / "global"),
            tmp_path / "bad", torch.device("cpu"))
    with pytest.raises(ValueError, match="2 groups"):
        run_stage2(stage1_run, _with(grouped, init_from=tmp_path / "pp"),
                   tmp_path / "bad2", torch.device("cpu"))
