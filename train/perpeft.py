"""PerPEFT (Kim et al., WWW 2026) on PTMRec's stage 2: one set of PEFT parameters per user group.

Users are clustered by k-means (faiss) on the stage-1 model's user embeddings into G groups
(reference/ALGORITHMS.md §4). Each group g gets its own copy of the tuned tower parameters (prompts,
LoRA or (IA)^3; the frozen base of a tower is shared by reference, never copied) and its own content
heads; the backbone is shared and keeps training, reading group g's item features f^g whenever it
trains on group g's users. Training batches hold the users of one group and come in a shuffled
group order (PerPEFT's batch indexer); with `group_negatives` each group's negatives are drawn from
the items its own users trained on (PerPEFT's group-specific negative sampling). Every group starts
from the same parameters, so before the first step the grouped model scores exactly as the
ungrouped one.

Scores stay one dot product, so a grouped run exports to the same inner-product index and the
server needs no change: an item's vector is the concatenation [v_i^1, ..., v_i^G] of its G group
vectors (G·d), and a user of group g gets [0, .., u^g, .., 0], its own vector in block g, so
u · v = u^g · v_i^g. A cold item's vector is the same concatenation of the groups' fused head
outputs; the exported ONNX tower computes all G blocks in one graph (the frozen weights once).
The index, the item vectors and the towers' compute grow by a factor G.

Modules are "grouped" in one of two modes: `active = g` (training on group g: only group g's member
runs, outputs have the ungrouped width) or `active = None` (everything else: the concatenation).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator

import faiss
import numpy as np
import torch
from torch import Tensor, nn

from train.backbones.base import Backbone
from train.sampling import Batch, NegativeSampler, epoch_batches


def cluster_users(users: Tensor, groups: int, seed: int, niter: int = 100) -> Tensor:
    """k-means group (0..groups-1) of every user row, (U,) int64 on the users' device."""
    x = np.ascontiguousarray(users.detach().float().cpu().numpy())
    if groups > len(x):
        raise ValueError(f"perpeft: {groups} groups for {len(x)} users")
    kmeans = faiss.Kmeans(x.shape[1], groups, niter=niter, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 20)
    kmeans.train(x)
    _, assign = kmeans.index.search(x, 1)
    return torch.from_numpy(assign[:, 0].astype(np.int64)).to(users.device)


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy that owns copies of the trainable parameters and shares every frozen parameter
    and buffer with `module` (by reference: G groups cost G sets of PEFT parameters, not G towers)."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    memo |= {id(b): b for b in module.buffers()}
    return copy.deepcopy(module, memo)


class _GroupedModule(nn.Module):
    """G member modules: run member `active`, or all of them concatenated along dim 1."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.active: int | None = None

    @property
    def groups(self) -> int:
        return len(self.members)

    def forward(self, x):
        if self.active is not None:
            return self.members[self.active](x)
        return torch.cat([m(x) for m in self.members], dim=1)


class GroupedTower(_GroupedModule):
    """An encoder tower per group; everything but forward (prepare, tokenizer, preprocessing
    spec, token hook) is the first member's, which all members share. Members share their frozen
    weights by reference: merge adapters member by member into separate copies
    (export.tuned.deployable), never into the shared base."""

    @classmethod
    def copies(cls, tower: nn.Module, groups: int) -> GroupedTower:
        """`groups` members: the tower itself and copies sharing its frozen weights."""
        return cls([tower] + [shared_copy(tower) for _ in range(groups - 1)])

    @classmethod
    def tiled(cls, tower: nn.Module, groups: int) -> TiledTower:
        """The same (untuned) tower in every group: run once, its features repeated G times."""
        return TiledTower([tower] * groups)

    @property
    def base(self) -> nn.Module:
        """The first member (what tokenizer and preprocessing exports inspect)."""
        return self.members[0]

    @property
    def out_dim(self) -> int:
        width = self.members[0].out_dim
        return width if self.active is not None else width * self.groups

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            members = self.__dict__.get("_modules", {}).get("members")
            if members is None:  # not initialised yet (copy, unpickling)
                raise
            return getattr(members[0], name)


class TiledTower(GroupedTower):
    """One untuned tower standing in for every group: computed once, repeated G times."""

    def forward(self, x):
        out = self.members[0](x)
        return out if self.active is not None else out.repeat(1, self.groups)


class GroupedHead(_GroupedModule):
    """A content head per group on its block of the features: (N, G·D) -> (N, G·d)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.active is not None:
            return self.members[self.active](x)
        width = self.members[0].in_features
        if x.shape[-1] != width * self.groups:
            raise ValueError(f"grouped head: features of width {x.shape[-1]}, expected "
                             f"{self.groups} group blocks of {width}")
        blocks = x.chunk(self.groups, dim=1)
        return torch.cat([m(b) for m, b in zip(self.members, blocks)], dim=1)


class _Call(nn.Module):
    """`functional_call` runs forward; this forward runs a named method of the backbone."""

    def __init__(self, inner: Backbone) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, method: str, *args):
        return getattr(self.inner, method)(*args)


class GroupedBackbone(Backbone):
    """The stage-1 backbone shared by all groups, with one copy of its item-feature tables per
    group (`tables[g][m]`, own Parameters, so a group's step moves only its own tables even under
    Adam's momentum); calls for group g run the backbone with group g's tables in place of its
    own, which stay frozen stand-ins. `features[m]` is the (I, G·D_m) side-by-side view."""

    def __init__(self, inner: Backbone, assignment: Tensor, groups: int) -> None:
        super().__init__()
        self.inner = inner
        self.n_groups = groups
        self.register_buffer("groups", assignment.clone())
        own = getattr(inner, "features", None) or {}
        self.tables = nn.ModuleList(
            nn.ParameterDict({m: nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
                              for m, t in own.items()})
            for _ in range(groups))
        for table in own.values():
            table.requires_grad_(False)
        self.active: int | None = None

    @property
    def features(self) -> dict[str, Tensor]:
        """Every group's feature table side by side, (I, G·D_m) per modality (a copy)."""
        return {m: torch.cat([t[m] for t in self.tables], dim=1).detach()
                for m in self.tables[0]}

    @property
    def dim(self) -> int:
        """The active group's d, or G·d for the block concatenation."""
        return self.inner.dim * (1 if self.active is not None else self.n_groups)

    def set_features(self, modality: str, features: Tensor) -> None:
        """Write (I, G·D) features into the groups' tables, block g into group g's."""
        for table, block in zip(self.tables, features.chunk(self.n_groups, dim=1)):
            table[modality].data.copy_(block)

    def _run(self, group: int, method: str, *args):
        """A backbone method with group `group`'s feature tables."""
        params = {f"inner.features.{m}": t for m, t in self.tables[group].items()}
        return torch.func.functional_call(self._caller, params, (method, *args), strict=False)

    @property
    def _caller(self) -> _Call:
        return _Call(self.inner)

    def loss(self, batch: Batch) -> Tensor:
        if self.active is None:
            raise RuntimeError("GroupedBackbone.loss needs an active group (batches are per group)")
        return self._run(self.active, "loss", batch)

    def _assembled(self, method: str) -> tuple[Tensor, Tensor]:
        """(users, items) of `method` for the active group, or the one-hot-block concatenation:
        users (U, G·d) with each user's vector in its group's block, items (I, G·d)."""
        if self.active is not None:
            return self._run(self.active, method)
        per_group = [self._run(g, method) for g in range(self.n_groups)]
        d = per_group[0][0].shape[1]
        users = per_group[0][0].new_zeros(per_group[0][0].shape[0], d * self.n_groups)
        for g, (u, _) in enumerate(per_group):
            rows = self.groups == g
            users[rows, g * d:(g + 1) * d] = u[rows]
        return users, torch.cat([i for _, i in per_group], dim=1)

    def embeddings(self) -> tuple[Tensor, Tensor]:
        return self._assembled("embeddings")

    def id_embeddings(self) -> tuple[Tensor, Tensor]:
        return self._assembled("id_embeddings")

    def on_epoch_start(self, generator: torch.Generator) -> None:
        self.inner.on_epoch_start(generator)


def grouped_parts(*trees: nn.Module) -> list[nn.Module]:
    """The grouped modules (towers, heads, backbone) inside module trees."""
    return [m for tree in trees for m in tree.modules()
            if isinstance(m, (_GroupedModule, GroupedBackbone))]


def grouped(module: nn.Module) -> bool:
    """Whether a module tree holds grouped modules."""
    return bool(grouped_parts(module))


def set_active(parts: list[nn.Module], group: int | None) -> None:
    """Set the active group (None: all, concatenated) of grouped modules (`grouped_parts`)."""
    for m in parts:
        m.active = group


def activate(module: nn.Module, group: int | None) -> None:
    """Set the active group of every grouped module in a tree."""
    set_active(grouped_parts(module), group)


def group_heads(heads: nn.Module, groups: int) -> nn.Module:
    """Content heads with one copy of each modality's head per group (in place)."""
    for m in list(heads.heads):
        heads.heads[m] = GroupedHead([heads.heads[m]] + [copy.deepcopy(heads.heads[m])
                                                         for _ in range(groups - 1)])
    return heads


def tile_features(features: dict[str, Tensor], groups: int) -> dict[str, Tensor]:
    """Ungrouped (I, D) features as the grouped layout (I, G·D): the same block in every group."""
    return {m: f.repeat(1, groups) for m, f in features.items()}


def personalise(model: Backbone, heads: nn.Module, towers: dict[str, nn.Module], groups: int,
                assignment: Tensor) -> tuple[GroupedBackbone, nn.Module, dict[str, GroupedTower]]:
    """The grouped backbone, heads and towers (members initialised from the given ones)."""
    return (GroupedBackbone(model, assignment, groups), group_heads(heads, groups),
            {m: GroupedTower.copies(t, groups) for m, t in towers.items()})


def group_samplers(train: np.ndarray, assignment: np.ndarray, n_items: int, groups: int,
                   group_negatives: bool) -> list[tuple[Tensor, NegativeSampler]]:
    """Per group: its training pairs and a sampler whose negatives come from the group's own
    training items (group_negatives; from every training item for a user whose group offers it
    no negative within the sampler's rounds) or from every training item."""
    everything = np.unique(train[:, 1])
    out = []
    for g in range(groups):
        pairs = train[assignment[train[:, 0]] == g]
        if group_negatives:  # a user who trained on (nearly) all its group's items falls back
            sampler = NegativeSampler(pairs, n_items,
                                      fallback=NegativeSampler(pairs, n_items, everything))
        else:
            sampler = NegativeSampler(pairs, n_items, everything)
        out.append((torch.from_numpy(pairs), sampler))
    return out


def group_batches(samplers: list[tuple[Tensor, NegativeSampler]], batch_size: int,
                  generator: torch.Generator) -> Iterator[tuple[int, Batch]]:
    """One epoch of (group, batch): each group's pairs shuffled into batches of its own users,
    the batches of all groups in a shuffled order."""
    batches = [(g, b) for g, (pairs, sampler) in enumerate(samplers) if len(pairs)
               for b in epoch_batches(pairs, sampler, batch_size, generator)]
    for j in torch.randperm(len(batches), generator=generator).tolist():
        yield batches[j]


def group_sizes(assignment: Tensor, groups: int) -> list[int]:
    """Users per group."""
    return torch.bincount(assignment.cpu(), minlength=groups).tolist()
