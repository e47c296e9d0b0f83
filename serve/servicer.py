"""The gRPC servicer: one short method per RPC over a model holder, metrics and limits.

Every method reads `holder.model` once, so a hot swap never changes the model mid-request. Errors
map to status codes through the ServeError classes (see serve.limits and the table in
docs/serving.md); any other exception becomes INTERNAL with a reference that is also logged, so
the server never dies
on input.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import grpc

from serve._gen.ptmrec.v1 import recommender_pb2 as pb
from serve.arms import Router
from serve._gen.ptmrec.v1 import recommender_pb2_grpc as pb_grpc
from serve.errors import ServeError
from serve.experiment_config import NO_ARM
from serve.limits import (Limits, check_batch, check_id, check_interactions, check_item,
                          check_query, check_request_id)
from serve.metrics import Metrics
from serve.model import POPULAR, RECENT, USER, Recommendation, ServingModel
from serve.reload import ModelHolder

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
_SOURCES = {USER: pb.SOURCE_USER_VECTOR, RECENT: pb.SOURCE_RECENT_ITEMS,
            POPULAR: pb.SOURCE_POPULARITY}


def to_response(rec: Recommendation, version: int) -> pb.RecommendResponse:
    """A Recommendation as a RecommendResponse."""
    resp = pb.RecommendResponse(model_version=version, source=_SOURCES[rec.source],
                                fallback=rec.source != USER, fallback_reason=rec.reason,
                                recent_items_used=rec.recent_used)
    for item_id, score in zip(rec.item_ids.tolist(), rec.scores.tolist()):
        resp.items.add(item_id=item_id, score=score)
    return resp


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """Implements ptmrec.v1.Recommender."""

    def __init__(self, holder: ModelHolder, metrics: Metrics, limits: Limits | None = None,
                 router: Router | None = None):
        self.holder, self.metrics, self.limits = holder, metrics, limits or Limits()
        self.router = router or Router(holder)

    def Recommend(self, request, context):
        """Top-k for one user (from the model of the user's arm during an experiment)."""
        labels = {}
        return self._handle("Recommend", context, lambda: self._recommend(request, labels),
                            labels)

    def RecommendBatch(self, request, context):
        """Several Recommend calls from one model (or experiment) snapshot."""
        labels = {}

        def run():
            check_batch(len(request.requests), self.limits)
            pick = self.router.snapshot()
            queries = [self._query(r) for r in request.requests]
            picks = [pick(q.user_id) for q in queries]
            labels["arm"] = _batch_arm({p.arm for p in picks})
            return pb.RecommendBatchResponse(
                responses=[self._shown(p, q) for p, q in zip(picks, queries)])
        return self._handle("RecommendBatch", context, run, labels)

    def EncodeItem(self, request, context):
        """Vector of a raw item, no side effects."""
        def run():
            check_item(request.image, request.text, self.limits)
            model = self.holder.require()
            model.require_encoder()
            vec = self.holder.encode(model, request.image, request.text)
            return pb.EncodeItemResponse(vector=vec.tolist(), model_version=model.version)
        return self._handle("EncodeItem", context, run)

    def UpsertItem(self, request, context):
        """Encode an item, commit it to the event store, insert it into the live index."""
        def run():
            item_id = check_id(request.item_id)
            check_item(request.image, request.text, self.limits)
            request_id = check_request_id(request.request_id, self.limits)
            self.holder.require().require_encoder()
            done = self.holder.upsert(item_id, request.image, request.text, request.overwrite,
                                      request_id)
            return pb.UpsertItemResponse(item_id=item_id, replaced=done.replaced,
                                         model_version=done.model.version,
                                         index_items=done.model.n_items,
                                         event_id=done.event_id, duplicate=done.duplicate)
        return self._handle("UpsertItem", context, run)

    def DeleteItem(self, request, context):
        """Commit a delete to the event store and remove the item from the live index."""
        def run():
            item_id = check_id(request.item_id)
            done = self.holder.delete(item_id, check_request_id(request.request_id, self.limits))
            return pb.DeleteItemResponse(item_id=item_id, model_version=done.model.version,
                                         index_items=done.model.n_items,
                                         event_id=done.event_id, duplicate=done.duplicate)
        return self._handle("DeleteItem", context, run)

    def RecordInteractions(self, request, context):
        """Commit a user's interactions; they change the user's next Recommend."""
        def run():
            user, items, stamps = check_interactions(
                request.user_id, request.item_ids, request.timestamps, request.kind, self.limits,
                int(time.time()))
            done = self.holder.record(user, items, stamps, request.kind,
                                      check_request_id(request.request_id, self.limits))
            return pb.RecordInteractionsResponse(event_id=done.event_id, recorded=len(items),
                                                 duplicate=done.duplicate,
                                                 model_version=done.model.version)
        return self._handle("RecordInteractions", context, run)

    def GetModelInfo(self, request, context):
        """Manifest summary of the loaded bundle and the applied store position."""
        return self._handle("GetModelInfo", context, lambda: pb.ModelInfo(
            **self.holder.require().info(), store=self.holder.store.display,
            **self.router.info()))

    def _query(self, request: pb.RecommendRequest):
        """Validated fields of a RecommendRequest (exclude_seen defaults to true)."""
        exclude_seen = request.exclude_seen if request.HasField("exclude_seen") else True
        return check_query(request.user_id, request.k, request.exclude_item_ids, exclude_seen,
                           request.recent_item_ids, self.limits)

    def _recommend(self, request: pb.RecommendRequest, labels: dict) -> pb.RecommendResponse:
        """Validate, then answer from the model of the user's arm."""
        query = self._query(request)
        pick = self.router.pick(query.user_id)
        labels["arm"] = pick.arm or NO_ARM
        return self._shown(pick, query)

    def _shown(self, pick, query) -> pb.RecommendResponse:
        """Answer a query from a picked model; stamp and log the impression."""
        resp = self._answer(pick.model, query, pick.arm or NO_ARM)
        self.router.shown(pick, query.user_id, resp)
        return resp

    def _answer(self, model: ServingModel, query, arm: str = NO_ARM) -> pb.RecommendResponse:
        """Run a validated query and count its source (per arm)."""
        rec = model.recommend(query)
        self.metrics.answered_by(rec.source, arm)
        return to_response(rec, model.version)

    def _handle(self, method: str, context: grpc.ServicerContext, run: Callable,
                labels: dict | None = None):
        """Run one RPC body: time it, count it, map errors to status codes."""
        start = time.perf_counter()
        code, detail = "OK", ""
        try:
            return run()
        except ServeError as err:
            code, detail = err.code, str(err)
        except Exception:  # noqa: BLE001 - never let input kill the server
            ref = uuid.uuid4().hex[:12]
            log.exception("%s failed (ref %s)", method, ref)
            code, detail = "INTERNAL", f"internal error (ref {ref}); see the server log"
        finally:
            self.metrics.observe(method, code, time.perf_counter() - start,
                                 (labels or {}).get("arm", NO_ARM))
        context.abort(getattr(grpc.StatusCode, code), detail)


def _batch_arm(arms: set[str]) -> str:
    """The arm label of a batch: its one arm, "mixed", or none outside an experiment."""
    if len(arms) > 1:
        return "mixed"
    return (arms.pop() if arms else "") or NO_ARM
