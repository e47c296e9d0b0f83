"""Experiments in a real in-process server over SQLite and PostgreSQL, and the CLI."""
from __future__ import annotations

import time

import pytest

from bench.bundle_factory import BundleSpec, corrupt, probe_item, write_test_bundle
from index import bundle
from index.events import impressions as imp_store
from index.events import open_store
from serve.client import RecommenderClient
from serve.experiment import main as cli
from serve.experiment_config import assign, end_live, parse_config, read_live, write_live
from serve.readout import readout
from serve.server import serve

USERS = [u * 10 for u in range(50)]  # the factory's user ids


def experiment(**changes):
    return parse_config({
        "name": "exp1", "salt": "test-salt",
        "arms": [{"name": "control", "bundle": "v1", "share": 0.5},
                 {"name": "treatment", "bundle": "v2", "share": 0.5}],
        "overrides": {0: "treatment"}, "impressions": {"flush_seconds": 0.05},
        "attribution": {"window_seconds": 600}, **changes})


@pytest.fixture
def bundles(tmp_path):
    """v1 (published) and v2 (not published) of different item vectors."""
    write_test_bundle(tmp_path, BundleSpec(seed=0))
    write_test_bundle(tmp_path, BundleSpec(seed=1), publish=False)
    return tmp_path


@pytest.fixture
def server(bundles, store_url):
    running = serve(bundles, store=store_url, poll_seconds=0.05, retry_seconds=0.2)
    assert running.wait_ready(30)
    yield running
    running.stop(grace=1)


def until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def arm_requests(server, arm: str) -> float:
    return server.metrics.registry.get_sample_value(
        "recsys_requests_total", {"method": "Recommend", "code": "OK", "arm": arm}) or 0.0


def loads(server, result: str) -> float:
    return server.metrics.registry.get_sample_value("recsys_experiment_loads_total",
                                                    {"result": result})


def test_two_bundles_serve_their_users_and_the_readout_counts_clicks(server, bundles, store_url):
    cfg = experiment()
    with RecommenderClient(f"127.0.0.1:{server.port}") as c:
        assert c.recommend(10, 3).arm == ""
        write_live(bundles, cfg)
        until(lambda: c.info().experiment == "exp1")
        assert dict(c.info().arm_versions) == {"control": 1, "treatment": 2}
        shown = {}
        for user in USERS:
            resp = c.recommend(user, 5)
            arm = assign(cfg, user).name
            assert resp.arm == arm and resp.model_version == (1 if arm == "control" else 2)
            assert len(resp.impression_id) == 32
            shown[user] = resp
        assert shown[0].arm == "treatment"  # the override
        batch = c.recommend_batch([pb_request(u) for u in USERS[:6]]).responses
        assert [r.arm for r in batch] == [assign(cfg, u).name for u in USERS[:6]]
        assert c.upsert(77, *probe_item()).index_items == 201
        live = server.experiments.router.live
        assert all(a.require().has_item(77) for a in live.arms.values())  # both arms have it
        clicked = {u: shown[u].items[1].item_id for u in USERS[:10]}
        for user, item in clicked.items():
            c.record(user, [item], kind="click")
        assert arm_requests(server, "control") + arm_requests(server, "treatment") == 50
        end_live(bundles)
        until(lambda: c.info().experiment == "")
        assert c.recommend(10, 3).arm == "" and c.recommend(10, 3).model_version == 1
    store = open_store(store_url)
    until(lambda: len(imp_store.read(store, "exp1")) == 56)  # written off the request thread
    result = readout(store, cfg)
    store.close()
    arms = {a["arm"]: a for a in result["arms"]}
    expected = {name: sum(assign(cfg, u).name == name for u in clicked) for name in arms}
    for name, figures in arms.items():
        assert figures["clicks"] == figures["clicked_impressions"] == expected[name]
        assert figures["hit_at"][1] == 0.0 and figures["hit_at"][5] == figures["ctr"]
    assert sum(a["impressions"] for a in arms.values()) == 56


def pb_request(user: int):
    from serve._gen.ptmrec.v1 import recommender_pb2 as pb

    return pb.RecommendRequest(user_id=user, k=3)


def test_an_arm_bundle_that_fails_leaves_serving_unchanged(server, bundles):
    bad = write_test_bundle(bundles, BundleSpec(seed=2), publish=False)  # v3
    corrupt(bad)
    with RecommenderClient(f"127.0.0.1:{server.port}") as c:
        write_live(bundles, experiment(arms=[{"name": "control", "bundle": "v1", "share": 0.5},
                                             {"name": "treatment", "bundle": "v3",
                                              "share": 0.5}]))
        until(lambda: loads(server, "failure") >= 1)
        assert server.experiments.router.live is None
        assert c.recommend(10, 3).arm == "" and c.info().experiment == ""
        write_live(bundles, experiment())  # a good one is taken up
        until(lambda: c.info().experiment == "exp1")
        write_test_bundle(bundles, BundleSpec(seed=3), publish=False)  # v4, intact
        write_live(bundles, experiment(name="exp2", memory_limit_mib=1, arms=[
            {"name": "control", "bundle": "v1", "share": 0.5},
            {"name": "treatment", "bundle": "v4", "share": 0.5}]))  # does not fit
        until(lambda: loads(server, "failure") >= 2)
        assert c.info().experiment == "exp1" and c.recommend(0, 3).arm == "treatment"
    assert loads(server, "success") == 1


def test_an_arm_keeps_its_version_when_current_moves_on(server, bundles):
    with RecommenderClient(f"127.0.0.1:{server.port}") as c:
        write_live(bundles, experiment())
        until(lambda: c.info().experiment == "exp1")
        write_test_bundle(bundles, BundleSpec(seed=3))  # v3 published: the live bundle moves
        until(lambda: c.info().model_version == 3)
        control = next(u for u in USERS if assign(experiment(), u).name == "control")
        assert c.recommend(control, 3).model_version == 1
        until(lambda: server.experiments.router.live.arms["control"].pinned is None)
        assert c.upsert(78, *probe_item()).index_items == 201
        assert server.experiments.router.live.arms["control"].require().has_item(78)


def test_cli_start_status_promote_stop(bundles, capsys):
    config = bundles / "exp.yaml"
    config.write_text("name: exp1\nsalt: test-salt\narms:\n"
                      "  - {name: control, bundle: v1, share: 0.5}\n"
                      "  - {name: treatment, bundle: v9, share: 0.5}\n")
    assert cli(["start", "--bundles", str(bundles), "--config", str(config)]) == 1
    assert "arms.treatment.bundle: v9 is not in" in capsys.readouterr().err
    config.write_text(config.read_text().replace("v9", "v2").replace("0.5}\n  - {", "0.6}\n  - {"))
    assert cli(["start", "--bundles", str(bundles), "--config", str(config)]) == 1
    assert "arms: shares sum to 1.1, not 1" in capsys.readouterr().err
    config.write_text(config.read_text().replace("0.6", "0.5"))
    corrupt(bundles / "v2")
    assert cli(["start", "--bundles", str(bundles), "--config", str(config)]) == 1
    assert "arms.treatment.bundle: v2 is refused" in capsys.readouterr().err
    assert read_live(bundles) is None
    write_test_bundle(bundles, BundleSpec(seed=1), publish=False)  # v3, intact
    config.write_text(config.read_text().replace("v2", "v3"))
    assert cli(["start", "--bundles", str(bundles), "--config", str(config)]) == 0
    assert read_live(bundles).arm("treatment").bundle == "v3"
    assert cli(["status", "--bundles", str(bundles)]) == 0
    assert "| treatment | v3 | 0 | 0 | 0 |" in capsys.readouterr().out
    assert cli(["promote", "nope", "--bundles", str(bundles)]) == 1
    assert cli(["promote", "treatment", "--bundles", str(bundles)]) == 0
    assert bundle.current_version(bundles) == "v3" and read_live(bundles) is None
    assert cli(["status", "--bundles", str(bundles), "--name", "exp1", "--json"]) == 0
    assert '"running": false' in capsys.readouterr().out
    assert cli(["stop", "--bundles", str(bundles)]) == 0


def test_a_restarted_server_takes_up_its_experiment_before_serving(bundles, store_url):
    write_live(bundles, experiment())
    running = serve(bundles, store=store_url, poll_seconds=30)  # no poll before SERVING
    try:
        assert running.wait_ready(30)
        with RecommenderClient(f"127.0.0.1:{running.port}") as c:
            first = c.recommend(0, 3)
            assert (first.arm, first.model_version) == ("treatment", 2)
    finally:
        running.stop(grace=1)
