"""deploy/grafana: every metric the dashboard queries is one the server exports."""
from __future__ import annotations

import json
import re
from pathlib import Path

from serve.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "ptmrec-serving.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count")}
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "clamp_min", "max", "le",
                "method", "code", "source", "kind", "reason", "op", "result", "instance", "arm",
                "experiment", "model_version"}


def exported_names() -> set[str]:
    """Sample names the server's registry can expose (labelled families included)."""
    names = set()
    for family in Metrics().registry.collect():
        names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def queried_names(dashboard: dict) -> set[str]:
    """Metric names in the dashboard's PromQL expressions."""
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r'\{[^}]*\}|\[[^\]]*\]|"[^"]*"|\b\d+(\.\d+)?(e-?\d+)?\b', "",
                          target["expr"])
            names |= {w for w in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr)
                      if w not in PROMQL_WORDS}
    return names


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    queried = queried_names(dashboard)
    assert {"recsys_requests_total", "recsys_request_duration_seconds_bucket",
            "recsys_store_position", "process_resident_memory_bytes",
            "recsys_experiment_info", "recsys_impressions_total"} <= queried
    assert queried - exported_names() == set()


def test_dashboard_splits_requests_by_arm():
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    assert any("by (le, arm)" in e and "recsys_request_duration_seconds_bucket" in e
               for e in exprs)
    assert any("by (arm)" in e and "recsys_requests_total" in e for e in exprs)
    assert {"arm"} <= set(Metrics().requests._labelnames)


def test_checker_catches_a_metric_the_server_lacks():
    dashboard = {"panels": [{"targets": [{"expr": "rate(recsys_no_such_metric_total[5m])"}]}]}
    assert queried_names(dashboard) - exported_names() == {"recsys_no_such_metric_total"}
