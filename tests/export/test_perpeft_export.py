"""Exporting PerPEFT runs (stage 2 with user groups): G-block vectors in one inner-product index,
one ONNX graph per modality computing every group's block, served without server changes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export import export_run
from train.run import load_run
from index import ann
from index.bundle import ITEM_IDS, ITEMS_INDEX, USER_IDS, USERS, load_bundle
from serve.model import ServingModel
from tests.export.test_stage2_export import data_dir, stage1_run  # noqa: F401 (fixtures)
from train import perpeft
from train.data import load_dataset
from train.config import Stage2Config
from train.stage2 import run_stage2

CPU = torch.device("cpu")
CASES = {  # name -> (stage-2 settings, exporter)
    # text tuned, image frozen (a tiled tower in the graph), prompts kept in the graph
    "prompt-text": ({"method": {"name": "prompt", "n_ctx": 2, "depth": 2},
                     "modalities": ["text"]}, "dynamo"),
    # both towers tuned, adapters merged into one weight copy per group
    "lora": ({"method": {"name": "lora", "r": 4}, "modalities": ["image", "text"]}, "legacy"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, stage1_run, tmp_path_factory):  # noqa: F811
    settings, exporter = CASES[request.param]
    s2 = Stage2Config.model_validate(settings | {
        "groups": 2, "kt_batch_size": 16, "kt_steps_per_epoch": 4, "epochs": 1,
        "learning_rate": 1e-2, "keep_start": False})
    run = tmp_path_factory.mktemp(f"pp_{request.param}")
    run_stage2(stage1_run, s2, run, CPU)
    bundle = export_run(run, tmp_path_factory.mktemp("bundles"), exporter=exporter,
                        parity_items=16)
    return run, bundle


def test_bundle_scores_are_the_groups_scores(exported):
    run, bundle = exported
    manifest = load_bundle(bundle).manifest
    rebuilt = load_run(run)
    d = rebuilt.model.inner.user_embeddings().shape[1]
    assert manifest.user_groups == 2 and manifest.dim == 2 * d
    users, user_ids = np.load(bundle / USERS), np.load(bundle / USER_IDS)
    item_ids = np.load(bundle / ITEM_IDS)
    index = ann.load(bundle / ITEMS_INDEX)
    items = np.stack([index.reconstruct(int(i)) for i in item_ids])
    groups = rebuilt.model.groups.numpy()[user_ids]
    assert set(groups) == {0, 1}
    for g in (0, 1):  # zero outside the user's own block
        own = users[groups == g]
        assert np.abs(own[:, (1 - g) * d:(2 - g) * d]).max() == 0
        assert np.abs(own[:, g * d:(g + 1) * d]).max() > 0
    with torch.no_grad():
        for g in (0, 1):
            perpeft.activate(rebuilt.model, g)
            u, i = (t.numpy() for t in rebuilt.model.embeddings())
            warm = np.isin(item_ids, np.unique(rebuilt.train.train[:, 1]))
            rows = groups == g
            expected = u[user_ids[rows]] @ i[item_ids[warm]].T
            np.testing.assert_allclose(users[rows] @ items[warm].T, expected, atol=1e-4)
        perpeft.activate(rebuilt.model, None)


def test_served_cold_vectors_have_a_block_per_group(exported, data_dir):  # noqa: F811
    run, bundle = exported
    model = ServingModel.from_bundle(load_bundle(bundle))
    model.smoke()
    rebuilt = load_run(run)
    items = load_dataset(data_dir).items
    i = next(j for j, (t, p) in enumerate(zip(items.texts, items.images)) if t and p)
    got = model.encode(Path(items.images[i]).read_bytes(), items.texts[i])
    expected = rebuilt.heads(rebuilt.heads.select(rebuilt.features, torch.tensor([i])))[0]
    assert got.shape == (model.info()["dim"],) == expected.shape
    assert model.info()["user_groups"] == 2
    np.testing.assert_allclose(got, expected.detach().numpy(), atol=1e-4)
    first, second = np.split(got, 2)
    assert np.abs(first - second).max() > 1e-4  # each group's own tuned towers and heads
