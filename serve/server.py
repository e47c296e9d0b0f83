"""Server wiring: gRPC server, health, reflection, metrics endpoint and the bundle watcher.

    python -m serve --bundles DIR [--state DIR | --store postgresql://...] [--host 127.0.0.1]
                    [--port 50051] [--metrics-port 9100]

`start(ServerConfig(...))` returns a `RunningServer` whose `port` is the bound port (port 0 picks a
free one), so tests and benchmarks can run a real server in-process. The process imports neither
torch nor `train/`.

Lifecycle. The gRPC server starts first with `grpc.health.v1` NOT_SERVING for "" and
"ptmrec.v1.Recommender", and RPCs answer UNAVAILABLE. A PostgreSQL store is reached first, in
the background (serve.storewait: retried with backoff for `store_wait_seconds`, then
`RunningServer.failure` is set and `exit` fires). Then the watcher thread loads the bundle that
`bundles/CURRENT` names (sha256-verified, smoke-queried) and only then flips health to SERVING. On
stop (SIGTERM/SIGINT in `__main__`) health goes NOT_SERVING at once, calls keep being answered for
`drain_seconds` (so load balancers see NOT_SERVING and move traffic away; a second signal cuts
the drain short), then the watcher stops and `server.stop(grace)` refuses new calls and lets
in-flight RPCs finish within `grace_seconds`. The inspection page (`ui_port`, serve.ui), when on,
starts with the metrics endpoint, reads the holder's live model on every request and stops last.

Hot reload and online writes (details in serve.reload and docs/events.md): UpsertItem,
DeleteItem and RecordInteractions commit to the event store before they answer OK (SQLite under
`--state`, default BUNDLES/.state, or PostgreSQL with `--store`); on start and on every reload
the store's events after the bundle's watermark are applied (upserts re-encoded with the new
encoder) before one reference is swapped; a broken bundle is refused
(`recsys_reloads_total{result="failure"}`) and the old one keeps serving. A poller thread applies
the writes of other processes on the same store, woken at once by PostgreSQL's LISTEN/NOTIFY
(`store_listen`) and every `poll_seconds` in any case.

Concurrency. A thread pool serves RPCs (the Python gRPC layer costs ~0.3 ms of CPU per RPC and
holds the GIL for it; to use more cores, run several processes with `--reuse-port` on the same
port, each loading the bundle); FAISS searches run concurrently under the read side of
a readers-writer lock and upserts/deletes take the write side. `faiss.omp_set_num_threads(1)`
(configurable) because single-query searches are faster without OpenMP start-up.
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from pathlib import Path

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ConfigDict, Field

from index.events import SQLStore, StoreError, is_postgres, open_store
from index.events.postgres import redact
from serve._gen.ptmrec.v1 import recommender_pb2_grpc as pb_grpc
from serve.arms import ExperimentWatcher, Router
from serve.auth import AuthConfig, Authenticator, KeyFileError, check_exposure
from serve.catalogue import Catalogue, CatalogueError
from serve.encoding import EncodeLimits, EncodePool
from serve.guard import CountingPool, Gate
from serve.limits import MIB, Limits
from serve.metrics import Metrics
from serve.online import FoldIn, Poller
from serve.reload import ModelHolder, Watcher, build_model
from serve.servicer import SERVICE_NAME, RecommenderServicer
from serve.storewait import StoreWait
from serve.ui import InspectionServer, start_ui

log = logging.getLogger(__name__)


class ServerConfig(BaseModel):
    """Everything the server needs; built by __main__ or by tests, never from the environment."""

    model_config = ConfigDict(extra="forbid")

    bundles: Path
    state: Path | None = Field(None, description="SQLite event store folder; None: BUNDLES/.state")
    store: str | None = Field(None, description="postgresql://... (shared store); None: SQLite")
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(9100, ge=0, le=65535, description="None: no metrics HTTP")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    poll_seconds: float = Field(2.0, gt=0)
    store_listen: bool = Field(True, description="PostgreSQL: apply other processes' writes as "
                               "soon as they commit (LISTEN/NOTIFY), not only every poll")
    store_wait_seconds: float = Field(300.0, ge=0, description="how long to wait for an "
                                      "unreachable PostgreSQL store at start; 0: forever")
    retry_seconds: float = Field(60.0, ge=0)
    workers: int = Field(8, ge=1)
    max_concurrent_rpcs: int = Field(256, ge=1)
    grace_seconds: float = Field(5.0, ge=0)
    drain_seconds: float = Field(2.0, ge=0, description="answer calls this long after SIGTERM, "
                                 "health NOT_SERVING, before refusing new ones")
    reuse_port: bool = Field(False, description="SO_REUSEPORT: several processes share the port")
    faiss_threads: int = Field(1, ge=1)
    encoder_threads: int = Field(1, ge=1)
    ui_host: str = "127.0.0.1"
    ui_port: int | None = Field(None, ge=0, le=65535, description="inspection page; None: off")
    catalogue: Path | None = Field(None, description="MMRec items.tsv directory for the page's "
                                   "item texts and images")
    limits: Limits = Field(default_factory=Limits)
    encode: EncodeLimits = Field(default_factory=EncodeLimits)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    fold_in: FoldIn = Field(default_factory=FoldIn)

    def store_url(self) -> str:
        """The event store to open: --store, else the SQLite file under the state folder."""
        return self.store or str(self.state or self.bundles / ".state")


def open_event_store(cfg: ServerConfig) -> SQLStore:
    """Open the event store (SQLite: created now; PostgreSQL: connected later, by StoreWait), or
    fail with a message that says what to change."""
    url = cfg.store_url()
    try:
        return open_store(url, create=not is_postgres(url))
    except (StoreError, OSError) as err:
        raise RuntimeError(f"cannot open the event store {redact(url)}: {err} (pass --state "
                           f"DIR on a writable disk, or --store postgresql://...)") from err


class RunningServer:
    """A started server: its ports, collaborators and a stop()."""

    def __init__(self, server: grpc.Server, port: int, metrics_port: int | None,
                 holder: ModelHolder, watcher: Watcher, poller: Poller,
                 health_servicer: health.HealthServicer, metrics: Metrics, grace: float,
                 ui: InspectionServer | None = None):
        self.server, self.port, self.metrics_port = server, port, metrics_port
        self.ui, self.ui_port = ui, None if ui is None else ui.port
        self.holder, self.watcher, self.poller = holder, watcher, poller
        self.health, self.metrics = health_servicer, metrics
        self.grace = grace
        self.ready = threading.Event()
        self.exit = threading.Event()  # set by fail() (and by __main__'s signal handler)
        self.failure: str | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._drain_cut = threading.Event()
        self.experiments: ExperimentWatcher | None = None
        self.store_wait: StoreWait | None = None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a bundle is loaded and SERVING (or timeout); returns whether it is."""
        return self.ready.wait(timeout)

    def set_serving(self, _model=None) -> None:
        """Mark the service SERVING (called after each successful load)."""
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()

    def begin(self) -> None:
        """The store answered: start the watcher (load, replay, SERVING), poller and experiments."""
        with self._lock:
            if self._stopped:
                return
            self.watcher.start()
            self.poller.start()
            if self.experiments is not None:
                self.experiments.start()

    def fail(self, message: str) -> None:
        """The server cannot start serving: record why and wake whoever waits on `exit`."""
        self.failure = message
        self.exit.set()

    def stop(self, grace: float | None = None, drain: float = 0.0) -> None:
        """Health NOT_SERVING, keep answering for `drain` seconds, stop the threads, let in-flight
        RPCs finish within the grace period, close the store."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self.store_wait is not None:
            self.store_wait.stop()
        self.health.enter_graceful_shutdown()
        if drain > 0:
            log.info("health NOT_SERVING; draining for %.1f s before refusing new calls", drain)
            self._drain_cut.wait(drain)
        self.watcher.stop()
        self.poller.stop()
        self.server.stop(self.grace if grace is None else grace).wait()
        self.holder.encodes.shutdown()
        if self.experiments is not None:
            self.experiments.stop()  # writes the queued impressions
            self.experiments.store.close()
        self.holder.store.close()
        self.metrics.stop_http()
        if self.ui is not None:
            self.ui.stop()
        log.info("server stopped")

    def cut_drain(self) -> None:
        """End a drain in progress now (a second SIGTERM)."""
        self._drain_cut.set()

    def wait(self) -> None:
        """Block until the gRPC server terminates."""
        self.server.wait_for_termination()


def max_message_bytes(limits: Limits) -> int:
    """Largest request message answered (and counted) by the Gate: the image limit + 1 MiB."""
    return limits.max_image_bytes + MIB


def _grpc_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """Channel options: gRPC's transport cuts messages at twice the Gate's limit (those, cut
    before any Python code runs, are the only refusals not counted)."""
    return [("grpc.max_receive_message_length", 2 * max_message_bytes(cfg.limits)),
            ("grpc.max_send_message_length", 64 * MIB),
            ("grpc.so_reuseport", int(cfg.reuse_port))]


def _bind(server: grpc.Server, cfg: ServerConfig) -> int:
    """Add the (TLS or plaintext) port; returns the bound port."""
    address = f"{cfg.host}:{cfg.port}"
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    client_ca = cfg.auth.tls_client_ca
    if client_ca is not None and cfg.tls_cert is None:
        raise RuntimeError("--tls-client-ca needs --tls-cert and --tls-key")
    if cfg.tls_cert is not None:
        creds = grpc.ssl_server_credentials(
            [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
            root_certificates=client_ca.read_bytes() if client_ca else None,
            require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise RuntimeError(f"could not bind {address}")
    return port


def _authenticator(cfg: AuthConfig) -> Authenticator | None:
    """The API-key check, or None when no keys are configured; a bad key file stops the start."""
    if not cfg.has_keys():
        return None
    try:
        return Authenticator(cfg)
    except KeyFileError as err:
        raise RuntimeError(str(err)) from err


def _health() -> health.HealthServicer:
    """Health service, NOT_SERVING until a bundle is loaded."""
    servicer = health.HealthServicer(experimental_non_blocking=True,
                                     experimental_thread_pool=futures.ThreadPoolExecutor(1))
    for name in ("", SERVICE_NAME):
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return servicer


def _catalogue(cfg: ServerConfig) -> Catalogue:
    """The inspection page's catalogue (empty without --catalogue); a bad one stops the start."""
    if cfg.catalogue is None:
        return Catalogue.empty()
    if cfg.ui_port is None:
        log.warning("--catalogue %s has no effect without --ui-port", cfg.catalogue)
    try:
        return Catalogue.load(cfg.catalogue)
    except CatalogueError as err:
        raise RuntimeError(str(err)) from err


def start(cfg: ServerConfig) -> RunningServer:
    """Start the gRPC server, metrics endpoint, watcher and event poller; returns at once (not
    yet SERVING)."""
    check_exposure(cfg.auth, cfg.host, None if cfg.metrics_port is None else cfg.metrics_host,
                   None if cfg.ui_port is None else cfg.ui_host)
    catalogue = _catalogue(cfg)
    auth = _authenticator(cfg.auth)
    faiss.omp_set_num_threads(cfg.faiss_threads)
    metrics = Metrics()
    encodes = EncodePool(cfg.encode)
    holder = ModelHolder(open_event_store(cfg), metrics, encodes)
    # RPC threads waiting on encodes come on top of --workers, so other calls always have those
    pool = CountingPool(cfg.workers + cfg.encode.workers + cfg.encode.queue)
    gate = Gate(metrics, pool, cfg.max_concurrent_rpcs, max_message_bytes(cfg.limits),
                SERVICE_NAME, auth, busy=lambda: encodes.full)
    server = grpc.server(pool, interceptors=[gate], options=_grpc_options(cfg))
    router = Router(holder)
    pb_grpc.add_RecommenderServicer_to_server(
        RecommenderServicer(holder, metrics, cfg.limits, router), server)
    health_servicer = _health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, cfg)
    allow = None if auth is None else (lambda key: auth.allowed_role(key) is not None)
    metrics_port = (None if cfg.metrics_port is None
                    else metrics.start_http(cfg.metrics_host, cfg.metrics_port, allow))

    try:
        ui = None if cfg.ui_port is None else start_ui(holder, catalogue, cfg.ui_host,
                                                       cfg.ui_port, cfg.limits, metrics, allow)
    except OSError as err:
        metrics.stop_http()
        holder.store.close()
        raise RuntimeError(f"could not bind the inspection page on {cfg.ui_host}:{cfg.ui_port}: "
                           f"{err}") from err

    def build(path: Path):
        return build_model(path, cfg.encoder_threads, cfg.limits.max_image_pixels, cfg.fold_in,
                           cfg.limits.max_image_aspect)

    watcher = Watcher(cfg.bundles, holder, build, metrics, cfg.poll_seconds, cfg.retry_seconds)
    poller = Poller(holder, metrics, cfg.poll_seconds, cfg.store_listen)
    running = RunningServer(server, port, metrics_port, holder, watcher, poller, health_servicer,
                            metrics, cfg.grace_seconds, ui)
    running.experiments = ExperimentWatcher(cfg.bundles, holder, router, build, metrics,
                                            open_event_store(cfg), cfg.poll_seconds,
                                            cfg.retry_seconds)

    def on_swap(model) -> None:
        """A (re)started server takes up its experiment before SERVING, so users keep their arm;
        after a swap an arm that shared the old bundle gets its own holder at once."""
        try:
            running.experiments.check()
        except Exception:  # noqa: BLE001 - serving the live bundle matters more
            log.exception("experiment check after a bundle swap failed")
        running.set_serving(model)

    watcher.on_swap = on_swap
    running.store_wait = StoreWait(holder.store, metrics, cfg.store_wait_seconds, running.begin,
                                   running.fail)
    holder.starting = lambda: running.store_wait.waiting_for
    server.start()
    running.store_wait.start()
    log.info("gRPC on %s:%d (%s, %s), bundles from %s, event store %s", cfg.host, port,
             "mutual TLS" if cfg.auth.tls_client_ca else "TLS" if cfg.tls_cert else "plaintext",
             "API keys" if auth else "anonymous", cfg.bundles, holder.store.display)
    return running


def serve(bundles: str | Path, host: str = "127.0.0.1", port: int = 0,
          **options) -> RunningServer:
    """Start a server on host:port (0: a free port); see ServerConfig for the options."""
    options.setdefault("metrics_port", None)
    return start(ServerConfig(bundles=Path(bundles), host=host, port=port, **options))
