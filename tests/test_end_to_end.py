"""The whole path: synthetic catalogue -> train -> export -> real gRPC server -> Recommend."""
from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from export import export_run
from index import ann
from index.bundle import (ITEM_IDS, ITEMS_INDEX, SEEN_INDPTR, SEEN_ITEMS, USER_IDS, USERS,
                          load_bundle)
from serve.client import RecommenderClient
from serve.server import serve
from train.config import TrainConfig
from train.stage1 import run_stage1
from train.synthetic import generate


def demo_like_config(data: Path, cache: Path) -> TrainConfig:
    """configs/demo.yaml in miniature: LightGCN, tiny CLIP image tower, heads, cold start."""
    return TrainConfig.model_validate({
        "seed": 3, "data": {"path": str(data)},
        "encoders": {"image": {"name": "openclip_image", "model": "ptmrec-tiny", "init_seed": 0},
                     "cache_dir": str(cache)},
        "backbone": {"name": "lightgcn", "embedding_size": 16, "n_layers": 2},
        "heads": {"modalities": ["image"]},
        "cold_start": {"holdout_fraction": 0.1, "ks": [10, 20]},
        "optim": {"batch_size": 512, "epochs": 3}, "eval": {"ks": [10, 20], "patience": 5}})


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A server on a free loopback port serving the exported bundle of a fresh run."""
    root = tmp_path_factory.mktemp("e2e")
    generate(root / "data", n_users=100, n_items=60, seed=5)
    run_stage1(demo_like_config(root / "data", root / "cache"), root / "run", torch.device("cpu"))
    export_run(root / "run", root / "bundles", factory="Flat", publish_bundle=True)
    server = serve(root / "bundles", port=0)
    try:
        assert server.wait_ready(60), "server never became SERVING"
        with RecommenderClient(f"127.0.0.1:{server.port}", timeout=10) as client:
            yield client, Exported(root / "bundles" / "v1"), root / "data"
    finally:
        server.stop(grace=1)


class Exported:
    """The bundle's arrays, read directly (not through the server's code)."""

    def __init__(self, path: Path):
        bundle = load_bundle(path)
        self.manifest = bundle.manifest
        self.users, self.user_ids = bundle.load_npy(USERS), bundle.load_npy(USER_IDS)
        self.item_ids = bundle.load_npy(ITEM_IDS)
        self.indptr, self.seen = bundle.load_npy(SEEN_INDPTR), bundle.load_npy(SEEN_ITEMS)
        index = ann.load(path / ITEMS_INDEX)
        self.items = np.stack([index.reconstruct(int(i)) for i in self.item_ids])

    def seen_of(self, row: int) -> set[int]:
        """External ids of a user's training items."""
        return set(self.seen[self.indptr[row]:self.indptr[row + 1]].tolist())

    def top(self, row: int, k: int) -> list[int]:
        """Brute-force top-k by inner product, training items removed."""
        scores = self.items @ self.users[row]
        seen = self.seen_of(row)
        order = [int(self.item_ids[i]) for i in np.argsort(-scores, kind="stable")]
        return [i for i in order if i not in seen][:k]


def test_health_and_info(live):
    client, bundle, _ = live
    assert client.health() == "SERVING"
    info = client.info()
    assert info.model_version == 1 and info.users == len(bundle.user_ids) and info.cold_start


def test_recommend_matches_the_bundle_and_excludes_seen(live):
    client, bundle, _ = live
    for row in (0, 7, 42):
        user = int(bundle.user_ids[row])
        got = [it.item_id for it in client.recommend(user, k=10).items]
        assert got == bundle.top(row, 10)
        assert bundle.seen_of(row) and not set(got) & bundle.seen_of(row)


def test_new_item_is_encoded_inserted_and_recommendable(live):
    client, bundle, data = live
    image = (data / "images" / "0.png").read_bytes()
    vec = client.encode(image=image, text="").vector
    assert len(vec) == bundle.manifest.dim and np.isfinite(vec).all()
    new_id = int(bundle.item_ids.max()) + 100
    assert client.upsert(new_id, image=image).index_items == len(bundle.item_ids) + 1
    near = client.recommend(10**9, k=5, recent=[new_id])
    assert len(near.items) == 5 and new_id not in [it.item_id for it in near.items]
    with pytest.raises(grpc.RpcError) as err:
        client.upsert(new_id, image=image)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
