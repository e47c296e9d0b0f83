"""The stage-2 tuning step (train/stage2.py runs it): encoding items with the tuned towers, the
tuning losses that reach the prompts / adapters and heads (PTMRec's KT, or BPR for the ablation
without KT), and one training epoch of (user group, batch) pairs.
"""
from __future__ import annotations

import torch

from train import distributed, perpeft
from train.config import Stage2Config
from train.losses import bpr_loss, knowledge_transfer
from train.sampling import batch_to, rank_part


def length_order(tower, raw: list) -> list[int] | None:
    """Indices of text items by length (batches padded to their longest then waste little);
    None for other modalities."""
    if getattr(tower, "modality", None) != "text":
        return None
    return sorted(range(len(raw)), key=lambda j: len(raw[j] or ""))


def encode(tower, raw: list, batch_size: int, device: torch.device, grad: bool,
           bf16: bool = False) -> torch.Tensor:
    """Encode raw items in batches (texts grouped by length), (N, d) on device in input order;
    bf16 autocast on CUDA, and on CPU too when `bf16`."""
    order = length_order(tower, raw)
    items = raw if order is None else [raw[j] for j in order]
    out = []
    with torch.set_grad_enabled(grad):
        for s in range(0, len(items), batch_size):
            prepared = tower.prepare_counted(items[s:s + batch_size])[0]
            prepared = ({k: v.to(device) for k, v in prepared.items()}
                        if isinstance(prepared, dict) else prepared.to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=device.type == "cuda" or bf16):
                out.append(tower(prepared).float())
    feats = torch.cat(out)
    if order is None:
        return feats
    inverse = torch.empty(len(order), dtype=torch.long, device=feats.device)
    index = torch.tensor(order, device=feats.device)
    inverse[index] = torch.arange(len(order), device=feats.device)
    return feats.index_select(0, inverse)


def refresh_features(model, towers, raw, s2: Stage2Config, device) -> dict[str, torch.Tensor]:
    """Re-encode every item with the tuned towers (frozen features for the other modalities)
    and write the result into the backbone's feature tables."""
    for t in towers.values():
        t.eval()
    tuned = {m: encode_sharded(t, raw[m], s2, device) for m, t in towers.items()}
    set_feature_tables(model, tuned)
    return raw["frozen"] | tuned


def encode_sharded(tower, raw: list, s2: Stage2Config, device) -> torch.Tensor:
    """encode() of all items without gradients; under torchrun each rank encodes its contiguous
    part of the items and the parts are gathered in rank order on every rank."""
    if not distributed.active():
        return encode(tower, raw, s2.encode.batch_size, device, grad=False, bf16=s2.encode.cpu_bf16)
    mine = distributed.part(len(raw))
    feats = (encode(tower, raw[mine], s2.encode.batch_size, device, grad=False,
                    bf16=s2.encode.cpu_bf16) if mine.stop > mine.start else None)
    return distributed.gather_rows(feats, device)


def set_feature_tables(model, features: dict[str, torch.Tensor]) -> None:
    """Write (n_items, d) features into the backbone's feature tables of the same shape (a
    backbone without tables, or of another shape for a modality, keeps its own)."""
    tables = getattr(model, "features", {})
    for m, f in features.items():
        if m in tables and tables[m].shape == f.shape:
            model.set_features(m, f)


def head_vectors(heads, tower, m: str, raw, items: torch.Tensor, s2: Stage2Config,
                 device) -> torch.Tensor:
    """head_m(tower_m(item)) with gradients, (n, d): each distinct item is encoded once; under
    torchrun each rank encodes its contiguous part of the distinct items (only those carry its
    gradients) and gets the others' vectors from them."""
    uniq, inverse = torch.unique(items, return_inverse=True)
    tower.train(s2.encode.tower_dropout)  # eval: no dropout in the frozen base, grads still flow
    mine = distributed.part(len(uniq))
    vectors = None
    if mine.stop > mine.start:
        f = encode(tower, [raw[m][j] for j in uniq[mine].tolist()], s2.encode.batch_size, device,
                   grad=True, bf16=s2.encode.cpu_bf16)
        vectors = heads.heads[m](f)
    if distributed.active():
        vectors = distributed.gather_rows(vectors, device)
    return vectors[inverse.to(vectors.device)]


def kt_step_loss(heads, towers, raw, targets, batch, s2: Stage2Config, device) -> torch.Tensor:
    """KT loss Σ_m KL(p_id || p_m) of the first kt_batch_size pairs."""
    users, pos = batch.users[:s2.kt.batch_size], batch.pos[:s2.kt.batch_size]
    u, i = targets[0][users].detach(), targets[1][pos].detach()
    loss = torch.zeros((), device=device)
    for m, tower in towers.items():
        item_m = head_vectors(heads, tower, m, raw, pos, s2, device)
        loss = loss + knowledge_transfer(u, i, u, item_m)
    return s2.kt.weight * loss


def bpr_step_loss(heads, towers, raw, targets, batch, s2: Stage2Config, device) -> torch.Tensor:
    """Ablation without KT: Σ_m BPR(u · head_m(f_m(pos)), u · head_m(f_m(neg))) of the first
    kt_batch_size triples, u detached from the backbone."""
    k = s2.kt.batch_size
    users, items = batch.users[:k], torch.cat([batch.pos[:k], batch.neg[:k]])
    u = targets[0][users].detach()
    loss = torch.zeros((), device=device)
    for m, tower in towers.items():
        pos, neg = head_vectors(heads, tower, m, raw, items, s2, device).chunk(2)
        loss = loss + bpr_loss((u * pos).sum(1), (u * neg).sum(1))
    return s2.kt.weight * loss


TUNING_LOSSES = {"kt": kt_step_loss, "bpr": bpr_step_loss}


def group_targets(model, groups: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Detached (users, items) snapshot per group (one entry when ungrouped): the KT targets."""
    with torch.no_grad():
        if groups == 1:
            return [model.embeddings()]
        targets = []
        for g in range(groups):
            perpeft.activate(model, g)
            targets.append(model.embeddings())
        perpeft.activate(model, None)
        return targets


def train_epoch(model, heads, towers, raw, optimizer, batches, s2, device, step_cap) -> float:
    """One epoch of (group, batch) pairs (group None when ungrouped): backbone loss on every
    batch, the tuning loss (KT or BPR) on the first `step_cap` batches; a group's batch runs its
    own members of the grouped modules, so only they get gradients.

    Under torchrun (train/distributed.py) each rank trains the backbone on its part of the batch,
    weighted by its share, and encodes its part of the tuning loss's distinct items; the tuning
    loss itself is computed whole on every rank (scaled by N, as only this rank's items carry its
    gradients), and the gradients are averaged before each Adam step: the step of one process on
    the whole batch, up to the order of float additions."""
    targets = group_targets(model, s2.perpeft.groups)
    parts = perpeft.grouped_parts(model, heads, *towers.values())  # found once, not per batch
    params = [p for g in optimizer.param_groups for p in g["params"]]
    size = distributed.world_size()
    total, n = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for n, (group, batch) in enumerate(batches, start=1):
        batch = batch_to(batch, device)
        mine, weight = rank_part(batch)
        if group is not None:
            perpeft.set_active(parts, group)
        backbone = model.loss(mine)
        loss, tuning = backbone * weight, 0.0
        if s2.kt.weight > 0 and n <= step_cap:
            tuned = TUNING_LOSSES[s2.kt.loss](heads, towers, raw, targets[group or 0], batch, s2,
                                              device)
            loss, tuning = loss + tuned * size, tuned.item()
        (loss / s2.optim.grad_accumulation).backward()
        if n % s2.optim.grad_accumulation == 0:
            distributed.average_grads(params)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.item() if size == 1 else (backbone.item() * weight + tuning) / size
    distributed.average_grads(params)
    optimizer.step()
    perpeft.set_active(parts, None)
    return distributed.sum_float(total) / max(1, n)
