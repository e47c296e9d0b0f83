"""Prometheus metrics of the server, on their own registry and HTTP port (loopback by default).

Names follow the Prometheus conventions (SERVING.md §3.1): `recsys_` prefix, base units,
`_total` counters, no per-user labels.
- `recsys_request_duration_seconds{method,code,arm}` histogram and
  `recsys_requests_total{method,code,arm}` per RPC, gRPC status code name and experiment arm
  (`none` outside an experiment and for calls that are not Recommend / RecommendBatch; calls
  refused before a handler too: serve.guard);
- `recsys_index_items` live items, `recsys_model_version` and `recsys_build_info{model_version,
  backbone,faiss_factory} 1` of the bundle being served;
- `recsys_encode_duration_seconds` time spent in the ONNX towers (EncodeItem, UpsertItem);
- `recsys_reloads_total{result="success|failure"}` bundle swaps and refused bundles;
- `recsys_recommend_source_total{source,arm}` which query answered (user vector or a fallback);
- `recsys_store_position` the last event-store id applied to the live bundle, `recsys_store_head`
  the newest id this process has seen in the store (their difference is the replication lag),
  `recsys_store_bytes` the store's disk use, `recsys_online_events_total{kind}` events applied,
  `recsys_store_skipped_total{reason="damaged|unencodable"}` events skipped,
  `recsys_store_errors_total{op="write|read|connect"}` store failures (writes answered
  UNAVAILABLE or RESOURCE_EXHAUSTED, polls that failed, tries to reach the store at start),
  `recsys_store_ready` 1 once the store was reached at start, `recsys_store_listening` 1 while
  the PostgreSQL LISTEN connection is open, `recsys_store_listen_failures_total` its failures;
- `recsys_experiment_info{experiment,arm,model_version} 1` per live arm,
  `recsys_experiment_loads_total{result}` experiments taken up or refused,
  `recsys_impressions_total{result="queued|written|dropped|failed"}` and
  `recsys_impression_queue` the impression log (serve.impressions);
- `process_*` (resident memory, CPU) from prometheus_client's process collector.
"""
from __future__ import annotations

import logging

import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               make_wsgi_app, start_http_server)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0)


class Metrics:
    """All server metrics on one registry; `start_http` exposes them."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = reg = registry or CollectorRegistry()
        ProcessCollector(registry=reg)
        self.request_duration = Histogram(
            "recsys_request_duration_seconds", "RPC latency by method, status code and arm",
            ["method", "code", "arm"], buckets=LATENCY_BUCKETS, registry=reg)
        self.requests = Counter("recsys_requests", "RPCs by method, status code and arm",
                                ["method", "code", "arm"], registry=reg)
        self.index_items = Gauge("recsys_index_items", "Items live in the index", registry=reg)
        self.model_version = Gauge("recsys_model_version", "Bundle version served", registry=reg)
        self.build_info = Gauge("recsys_build_info", "Bundle served (value 1)",
                                ["model_version", "backbone", "faiss_factory"], registry=reg)
        self.encode_duration = Histogram("recsys_encode_duration_seconds",
                                         "Time in the ONNX item encoder", buckets=LATENCY_BUCKETS,
                                         registry=reg)
        self.reloads = Counter("recsys_reloads", "Bundle reloads by result", ["result"],
                               registry=reg)
        self.sources = Counter("recsys_recommend_source",
                               "Recommend answers by query source and arm", ["source", "arm"],
                               registry=reg)
        self.store_position = Gauge("recsys_store_position",
                                    "Last event-store id applied to the live bundle", registry=reg)
        self.store_head = Gauge("recsys_store_head", "Newest event-store id seen", registry=reg)
        self.store_bytes = Gauge("recsys_store_bytes", "Disk bytes of the event store",
                                 registry=reg)
        self.online_events = Counter("recsys_online_events", "Store events applied by kind",
                                     ["kind"], registry=reg)
        self.store_skipped = Counter("recsys_store_skipped", "Store events skipped by reason",
                                     ["reason"], registry=reg)
        self.store_errors = Counter("recsys_store_errors", "Event-store failures by operation",
                                    ["op"], registry=reg)
        self.store_listening = Gauge("recsys_store_listening", "1 while the LISTEN connection "
                                     "to the PostgreSQL store is open", registry=reg)
        self.store_listen_failures = Counter("recsys_store_listen_failures", "LISTEN connections "
                                             "that failed or were lost", registry=reg)
        self.store_ready = Gauge("recsys_store_ready", "1 once the event store was reached at "
                                 "start", registry=reg)
        self.experiment_info = Gauge("recsys_experiment_info", "Live experiment arms (value 1)",
                                     ["experiment", "arm", "model_version"], registry=reg)
        self.experiment_loads = Counter("recsys_experiment_loads",
                                        "Experiments taken up or refused", ["result"],
                                        registry=reg)
        self.impressions = Counter("recsys_impressions", "Experiment impressions by outcome",
                                   ["result"], registry=reg)
        self.impression_queue = Gauge("recsys_impression_queue", "Impressions waiting to be "
                                      "written", registry=reg)
        for result in ("queued", "written", "dropped", "failed"):
            self.impressions.labels(result=result)
        for result in ("success", "failure"):
            self.experiment_loads.labels(result=result)
        for reason in ("damaged", "unencodable"):
            self.store_skipped.labels(reason=reason)
        for op in ("write", "read", "connect"):
            self.store_errors.labels(op=op)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)
        self._http = None
        self._children: dict[tuple[str, str, str], tuple] = {}
        self._sources: dict[tuple[str, str], Counter] = {}
        self._info_labels: tuple[str, ...] | None = None

    def observe(self, method: str, code: str, seconds: float, arm: str = "none") -> None:
        """Record one finished RPC (label children cached: labels() costs ~10 us a call)."""
        children = self._children.get((method, code, arm))
        if children is None:
            children = (self.request_duration.labels(method=method, code=code, arm=arm),
                        self.requests.labels(method=method, code=code, arm=arm))
            self._children[(method, code, arm)] = children
        children[0].observe(seconds)
        children[1].inc()

    def answered_by(self, source: str, arm: str = "none") -> None:
        """Count a Recommend answer by its query source and experiment arm."""
        child = self._sources.get((source, arm))
        if child is None:
            child = self._sources[(source, arm)] = self.sources.labels(source=source, arm=arm)
        child.inc()

    def arms(self, experiment: str | None, versions: dict[str, int]) -> None:
        """Export the live experiment's arms (none: clear them)."""
        self.experiment_info.clear()
        for arm, version in versions.items():
            self.experiment_info.labels(experiment or "", arm, str(version)).set(1)

    def loaded(self, model) -> None:
        """Export the gauges of the model now served."""
        m = model.manifest
        labels = (str(m.version), m.backbone, m.faiss_factory)
        if labels != self._info_labels:
            if self._info_labels is not None:
                self.build_info.remove(*self._info_labels)
            self.build_info.labels(*labels).set(1)
            self._info_labels = labels
        self.model_version.set(m.version)
        self.index_items.set(model.n_items)
        self.store_position.set(model.position)

    def start_http(self, host: str = "127.0.0.1", port: int = 9100,
                   allow: Callable[[str | None], bool] | None = None) -> int:
        """Serve /metrics on host:port (0 picks a free port); with `allow`, only to requests whose
        `Authorization: Bearer KEY` it accepts (else 401). Returns the bound port."""
        if allow is None:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            server_class = type("MetricsServer", (_ThreadingServer,), {"address_family": family})
            self._http = make_server(host, port, _guarded(make_wsgi_app(self.registry), allow),
                                     server_class, handler_class=_QuietHandler)
            threading.Thread(target=self._http.serve_forever, name="metrics-http",
                             daemon=True).start()
        bound = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop_http(self) -> None:
        """Stop the metrics HTTP server if running."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A threaded WSGI server for /metrics."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No access log lines on stderr."""

    def log_message(self, *_args) -> None:
        pass


def _guarded(app: Callable, allow: Callable[[str | None], bool]) -> Callable:
    """A WSGI app answering 401 unless `allow` accepts the request's bearer key."""
    def guarded(environ, start_response):
        header = environ.get("HTTP_AUTHORIZATION", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else None
        if not allow(key):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                 ("WWW-Authenticate", 'Bearer realm="metrics"')])
            return [b"missing or invalid credentials\n"]
        return app(environ, start_response)
    return guarded
