"""IVLP deep prompts: positions, depth semantics, identity at n_ctx = 0, training and tracing."""
from __future__ import annotations

import pytest
import torch

from train.encoders import TINY_CLIP, MiniLMConfig, OpenClipImageConfig, OpenClipTextConfig, build_encoder
from train.encoders.base import TokenState
from train.encoders.prompts import (
    DeepPrompts, PromptConfig, attach_prompts, count_trainable, prompted_text_config,
)

TEXTS = ["a red round shoe", "blue cotton shirt, size M"]
KINDS = ["image", "text", "minilm"]


def _tower(kind: str, n_ctx: int = 2):
    """A small tower of each kind; the text tower leaves room for n_ctx prompts."""
    if kind == "image":
        return build_encoder(OpenClipImageConfig(model=TINY_CLIP, init_seed=0))
    if kind == "text":
        return build_encoder(prompted_text_config(OpenClipTextConfig(model=TINY_CLIP, init_seed=0), n_ctx))
    return build_encoder(MiniLMConfig(max_seq_length=12))


def _inputs(tower):
    """Two prepared items for a tower."""
    if tower.modality == "image":
        return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return tower.prepare(TEXTS)


def _record_blocks(tower) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) tokens of every block, filled on the next forward."""
    seen: list = []
    for block in tower.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    return seen


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_ctx,depth", [(0, 9), (2, 0)])
def test_empty_prompts_reproduce_the_frozen_tower(kind, n_ctx, depth):
    tower = _tower(kind).requires_grad_(False)  # torch's MHA takes another path for frozen weights (~1e-6)
    x = _inputs(tower)
    with torch.no_grad():
        frozen = tower(x)
        hook = attach_prompts(tower, PromptConfig(n_ctx=n_ctx, depth=depth))
        prompted = tower(x)
    assert hook.prompts.numel() == 0 and count_trainable(tower)[0] == 0
    torch.testing.assert_close(prompted, frozen, atol=0, rtol=0)


def test_layer0_insertion_positions_masks_and_pool_index():
    x = torch.randn(2, 5, 4)  # (B, L, W)
    pad = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    state = TokenState(x, pad_mask=pad, pool_index=torch.tensor([2, 0]))
    hook = DeepPrompts(3, 2, 4, "after_first")
    after = hook.on_embed(state)
    assert after.x.shape == (2, 7, 4)
    torch.testing.assert_close(after.x[:, 0], x[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(after.x[:, 1:3], hook.prompts[0].expand(2, -1, -1), atol=0, rtol=0)
    torch.testing.assert_close(after.x[:, 3:], x[:, 1:], atol=0, rtol=0)
    assert after.pad_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert after.pool_mask.tolist() == [[1, 0, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 1, 1]]
    assert after.pool_index.tolist() == [4, 0]  # EOT moves by n_ctx; a first-token pool stays
    appended = DeepPrompts(3, 2, 4, "append").on_embed(TokenState(x))
    torch.testing.assert_close(appended.x[:, :5], x, atol=0, rtol=0)
    assert appended.x.shape == (2, 7, 4) and appended.pad_mask is None


@pytest.mark.parametrize("placement,slots", [("append", slice(-2, None)), ("after_first", slice(1, 3))])
def test_deep_prompts_replace_only_in_blocks_1_to_depth_minus_1(placement, slots):
    hook = DeepPrompts(3, 2, 4, placement)
    state = TokenState(torch.randn(2, 6, 4))
    for index in range(5):
        out = hook.before_block(index, state).x
        if 1 <= index < 3:
            torch.testing.assert_close(out[:, slots], hook.prompts[index].expand(2, -1, -1), atol=0, rtol=0)
            keep = torch.ones(6, dtype=torch.bool)
            keep[slots] = False
            torch.testing.assert_close(out[:, keep], state.x[:, keep], atol=0, rtol=0)
        else:
            assert out is state.x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", [1, 2])
def test_blocks_see_prompts_at_their_positions(kind, depth):
    tower = _tower(kind)
    x = _inputs(tower)
    hook = attach_prompts(tower, PromptConfig(n_ctx=2, depth=depth))
    seen = _record_blocks(tower)
    with torch.no_grad():
        tower(x)
        p = hook.prompts
        if kind == "image":
            slots = slice(-2, None)
            assert seen[0][0].shape[1] == 1 + (64 // 16) ** 2 + 2
            expect0 = tower.visual.ln_pre(p[0])  # appended, no position, ln_pre applied
        elif kind == "text":
            slots = slice(1, 3)
            assert seen[0][0].shape[1] == tower.positional_embedding.shape[0] == 32
            expect0 = p[0] + tower.positional_embedding[1:3]  # positions 1..n_ctx
        else:
            slots = slice(1, 3)
            assert seen[0][0].shape[1] == x["input_ids"].shape[1] + 2
            expect0 = p[0]  # after the embedding LayerNorm
    torch.testing.assert_close(seen[0][0][:, slots], expect0.expand(2, -1, -1), atol=1e-6, rtol=0)
    block1_in, block0_out = seen[1][0], seen[0][1]
    if depth == 2:
        torch.testing.assert_close(block1_in[:, slots], p[1].detach().expand(2, -1, -1), atol=0, rtol=0)
    else:  # after depth the prompt tokens are carried, not removed or replaced
        torch.testing.assert_close(block1_in, block0_out, atol=0, rtol=0)
    assert block1_in.shape == block0_out.shape


def test_text_pool_index_points_at_the_shifted_eot(monkeypatch):
    tower = _tower("text")
    tokens = tower.prepare(TEXTS)
    assert tokens.shape[1] == 30  # the tiny model's 32 positions minus n_ctx
    attach_prompts(tower, PromptConfig(n_ctx=2, depth=2))
    pooled = []
    original = tower.pool
    monkeypatch.setattr(tower, "pool", lambda state: pooled.append(state.pool_index) or original(state))
    tower(tokens)
    assert pooled[0].tolist() == (tokens.argmax(dim=-1) + 2).tolist()


def test_text_tower_without_room_is_refused():
    full = build_encoder(OpenClipTextConfig(model=TINY_CLIP, init_seed=0))
    with pytest.raises(ValueError, match="prompted_text_config"):
        attach_prompts(full, PromptConfig(n_ctx=2))
    cfg = prompted_text_config(OpenClipTextConfig(model=TINY_CLIP, init_seed=0, context_length=16), 2)
    assert cfg.context_length == 16  # already short enough
    assert prompted_text_config(OpenClipTextConfig(model="ViT-B-32", init_seed=0), 2).context_length == 75


def test_minilm_prompts_are_attended_but_not_pooled(monkeypatch):
    tower = _tower("minilm")
    prepared = tower.prepare(TEXTS)
    attach_prompts(tower, PromptConfig(n_ctx=2, depth=3))
    states = []
    original = tower.pool
    monkeypatch.setattr(tower, "pool", lambda state: states.append(state) or original(state))
    tower(prepared)
    state, mask = states[0], prepared["attention_mask"]
    assert state.pad_mask[:, 1:3].eq(1).all() and state.pool_mask[:, 1:3].eq(0).all()
    assert torch.equal(state.pool_mask[:, [0, *range(3, state.x.shape[1])]], mask)


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_only_the_prompts(kind):
    tower = _tower(kind)
    x = _inputs(tower)
    frozen_state = {k: v.clone() for k, v in tower.state_dict().items()}
    hook = attach_prompts(tower, PromptConfig(n_ctx=2, depth=9, init_std=0.02))
    depth = min(9, len(tower.blocks))
    assert hook.depth == depth and count_trainable(tower)[0] == depth * 2 * tower.width
    target = torch.randn(2, tower.out_dim, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(hook.parameters(), lr=1.0)
    before = tower(x).detach()
    for _ in range(3):
        opt.zero_grad()
        (-(tower(x) * target).sum()).backward()
        assert all(p.grad is None for n, p in tower.named_parameters() if n != "token_hook.prompts")
        assert hook.prompts.grad is not None and hook.prompts.grad.abs().sum() > 0
        opt.step()
    assert (tower(x).detach() - before).abs().max() > 1e-4
    now = tower.state_dict()
    assert all(torch.equal(now[name], value) for name, value in frozen_state.items())


@pytest.mark.parametrize("kind", KINDS)
def test_prompted_tower_exports_without_data_dependent_control_flow(kind):
    tower = _tower(kind)
    x = _inputs(tower)
    attach_prompts(tower, PromptConfig(n_ctx=2, depth=2))
    exported = torch.export.export(tower, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), tower(x), atol=1e-6, rtol=0)
