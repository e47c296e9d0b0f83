"""Experiments without a server: config errors, the split, attribution and the statistics."""
from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from index import events as ev
from index.events.impressions import Impression
from serve.experiment_config import (ExperimentError, assign, bundle_bytes, check_memory,
                                     parse_config, sampled)
from serve.readout import attribute, figures, table, two_proportion_p, wilson

BASE = {"name": "exp1", "salt": "spring-2026",
        "arms": [{"name": "control", "bundle": "v1", "share": 0.5},
                 {"name": "treatment", "bundle": "v2", "share": 0.5}]}


def config(**changes):
    return parse_config({**BASE, **changes})


@pytest.mark.parametrize("changes, field", [
    ({"arms": [{"name": "a", "bundle": "v1", "share": 0.5},
               {"name": "b", "bundle": "v2", "share": 0.4}]}, "arms: shares sum to 0.9, not 1"),
    ({"arms": [{"name": "a", "bundle": "v1", "share": 0.5},
               {"name": "a", "bundle": "v2", "share": 0.5}]}, "duplicate arm names ['a']"),
    ({"salt": "has space"}, "salt: salt 'has space' must match"),
    ({"salt": "ab"}, "salt: salt 'ab' must match"),
    ({"arms": [{"name": "a", "bundle": "v1", "share": 1.0}]}, "arms: 1 given"),
    ({"arms": [{"name": "a", "bundle": "latest", "share": 0.5},
               {"name": "b", "bundle": "v2", "share": 0.5}]}, "arms.0.bundle"),
    ({"arms": [{"name": "none", "bundle": "v1", "share": 0.5},
               {"name": "b", "bundle": "v2", "share": 0.5}]}, "arms.0.name"),
    ({"overrides": {5: "nope"}}, "overrides: unknown arms"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
])
def test_bad_configs_name_the_field(changes, field):
    with pytest.raises(ExperimentError) as err:
        config(**changes)
    assert field in str(err.value)


def test_split_is_deterministic_and_within_one_percent_of_the_shares():
    cfg = config(arms=[{"name": "control", "bundle": "v1", "share": 0.5},
                       {"name": "t1", "bundle": "v2", "share": 0.3},
                       {"name": "t2", "bundle": "v3", "share": 0.2}])
    users = range(100_000)
    arms = [assign(cfg, u).name for u in users]
    counts = Counter(arms)
    for arm in cfg.arms:
        assert abs(counts[arm.name] / 100_000 - arm.share) < 0.01
    assert [assign(cfg, u).name for u in range(1000)] == arms[:1000]
    other = config(salt="autumn-2026")
    moved = sum(assign(other, u).name != assign(config(), u).name for u in range(10_000))
    assert 4000 < moved < 6000  # a new salt reshuffles about half of a 50/50 split


def test_split_is_the_same_in_another_process():
    code = ("from serve.experiment_config import parse_config, assign; import json, sys; "
            f"cfg = parse_config({BASE!r}); print(json.dumps([assign(cfg, u).name "
            "for u in range(200)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".")
    assert out.stdout.strip() == str([assign(config(), u).name for u in range(200)]).replace(
        "'", '"')


def test_overrides_and_unknown_users():
    cfg = config(overrides={7: "treatment", 8: "control"})
    assert assign(cfg, 7).name == "treatment" and assign(cfg, 8).name == "control"
    assert assign(cfg, 10 ** 15).name in {"control", "treatment"}  # any id, known or not


def test_sampling_is_per_user_and_near_the_rate():
    cfg = config(impressions={"sample_rate": 0.25})
    share = np.mean([sampled(cfg, u) for u in range(20_000)])
    assert abs(share - 0.25) < 0.01 and sampled(cfg, 3) == sampled(cfg, 3)
    assert all(sampled(config(), u) for u in range(100))


def imp(iid, user, arm, created, items):
    return Impression(iid, "exp1", arm, user, 1 if arm == "control" else 2, created,
                      np.array(items, dtype=np.int64))


def click(user, items, stamps, action="click"):
    return ev.interactions(user, items, stamps, action)


def test_attribution_on_a_hand_made_sequence():
    cfg = config(attribution={"window_seconds": 100, "actions": ["click"], "ks": [1, 2]})
    shown = [imp("a", 1, "control", 1000.0, [10, 11, 12]),
             imp("b", 1, "control", 1050.0, [11, 13]),
             imp("c", 2, "treatment", 1000.0, [20, 21]),
             imp("d", 3, "treatment", 1000.0, [30])]
    events = [click(1, [10], [1010]),      # a, position 0
              click(1, [11], [1060]),      # b (latest impression showing 11), position 0
              click(1, [12], [1200]),      # outside a's window: unattributed
              click(1, [10, 10], [1020, 1030]),  # same (impression, item): counted once
              click(2, [21], [1000]),      # c, position 1 (same second)
              click(2, [20], [999]),       # one second early (whole-second stamps): c
              click(3, [30], [1005], "purchase"),  # not a counted action
              click(4, [10], [1010])]      # user without impressions
    found = attribute(shown, events, cfg.attribution)
    assert found.clicks == {"a": {0}, "b": {0}, "c": {0, 1}}
    assert found.unattributed == 2
    result = figures(cfg, shown, events)
    control, treatment = result["arms"]
    assert (control["impressions"], control["users"], control["clicks"]) == (2, 1, 2)
    assert (control["clicked_impressions"], control["ctr"]) == (2, 1.0)
    assert (treatment["impressions"], treatment["users"], treatment["clicks"]) == (2, 2, 2)
    assert treatment["ctr"] == 0.5 and treatment["hit_at"] == {1: 0.5, 2: 0.5}
    assert treatment["clicks_per_impression"] == 1.0 and treatment["user_rate"] == 0.5
    assert "| treatment | v2 | 2 | 2 | 2 |" in table(result)


def test_statistics_come_from_scipy_and_agree_with_the_z_test():
    low, high = wilson(30, 100)
    ci = stats.binomtest(30, 100).proportion_ci(0.95, method="wilson")
    assert (low, high) == (ci.low, ci.high)
    p1, p0, n = 0.12, 0.10, 5000
    pooled = (p1 + p0) / 2
    z = (p1 - p0) / math.sqrt(pooled * (1 - pooled) * 2 / n)
    assert two_proportion_p(600, n, 500, n) == pytest.approx(2 * stats.norm.sf(z), rel=1e-9)
    assert two_proportion_p(0, 10, 0, 10) == 1.0 and math.isnan(wilson(0, 0)[0])


def test_readout_finds_a_better_arm():
    rng = np.random.default_rng(0)
    cfg = config()
    shown, events = [], []
    for u in range(4000):
        arm = assign(cfg, u).name
        shown.append(imp(f"i{u}", u, arm, 100.0, [u, u + 1]))
        if rng.random() < (0.30 if arm == "treatment" else 0.20):
            events.append(click(u, [u + 1], [150]))
    result = figures(cfg, shown, events)
    control, treatment = result["arms"]
    assert treatment["ctr"] > control["ctr"] and treatment["vs_control"]["p_value"] < 1e-6
    assert result["winner"] == "treatment"
    rel_low, rel_high = treatment["vs_control"]["relative_ctr_ci"]
    assert 1.0 < rel_low < 1.5 < rel_high


def test_memory_check_names_the_bundles(bundle_v1):
    from serve.arms import read_manifest

    manifest = read_manifest(bundle_v1)
    need = bundle_bytes(manifest)
    assert need > sum(f.bytes for f in manifest.files.values())
    assert check_memory(config(), {"v2": manifest}, available=need + 1) == need
    with pytest.raises(ExperimentError, match=r"need ~\d+ MiB \(v2 ~\d+ MiB\) but only 1 MiB"):
        check_memory(config(memory_limit_mib=1), {"v2": manifest})
