"""The request hot path's shortcuts keep their contracts: history reads of concurrent requests share one pipeline
(real Redis), the recommend body serialised with orjson is exactly the documented model, the access log is off
unless MISSREC_ACCESS_LOG turns it on."""

from __future__ import annotations

import asyncio
import logging
import math

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from service.app import create_app
from service.recommender import Recommendation, RecommendedRow
from service.routers.recommend import _render_batch, response_dict
from service.schemas import BatchRecommendResponse, RecommendResponse
from service.settings import Settings
from service.store import CoalescedLists, HistoryStore


def test_concurrent_history_reads_share_one_pipeline(redis_url, key_prefix):
    async def run():
        redis = Redis.from_url(redis_url)
        try:
            store = HistoryStore(redis, prefix=key_prefix)
            for u in range(20):
                await store.append_events(f"user-{u}", [f"item-{u}-{j}" for j in range(u % 4 + 1)], None)
            before = store._lists.flushes
            got = await asyncio.gather(*(store.history(f"user-{u}") for u in range(20)), store.history("nobody"))
            burst = store._lists.flushes - before
            alone = await store.history("user-3")
            return got, burst, alone, store._lists
        finally:
            await redis.aclose()

    got, burst, alone, lists = asyncio.run(run())
    for u in range(20):
        assert got[u][0] == [f"item-{u}-{j}" for j in range(u % 4 + 1)]  # each caller gets its own list, in order
    assert got[20] == ([], [])
    assert burst == 1, "the 21 reads issued together were not sent as one pipeline"
    assert alone[0] == [f"item-3-{j}" for j in range(4)]
    assert lists.reads == 22


def test_a_failed_pipeline_fails_every_read_of_it_and_the_next_reads_work(redis_url, key_prefix):
    async def run():
        dead = CoalescedLists(Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))  # nothing listens
        failed = await asyncio.gather(*(dead.read(f"{key_prefix}:k{i}") for i in range(3)), return_exceptions=True)
        redis = Redis.from_url(redis_url)
        try:
            await redis.rpush(f"{key_prefix}:k", b"a", b"b")
            ok = await CoalescedLists(redis).read(f"{key_prefix}:k")
        finally:
            await redis.aclose()
        return failed, ok

    failed, ok = asyncio.run(run())
    assert len(failed) == 3 and all(isinstance(e, RedisConnectionError) for e in failed)
    assert ok == [b"a", b"b"]


def _rec(explained: bool) -> Recommendation:
    split = [{"part": "text", "score": 0.03, "share": 0.25}, {"part": "image", "score": 0.09, "share": 0.75}]
    because = [{"item_id": "B00Y", "position": 1, "contribution": 0.02}]
    note = {"text_weight": 0.5, "image_weight": 0.5, "interest": 3, "score_split": split, "because": because}
    note = note if explained else None
    rows = [RecommendedRow("B00X", 0.123456789, note), RecommendedRow("id with ü", -1.5e-7, note)]
    return Recommendation(items=rows, exact=True, model_version="missrec-abc", fallback=None)


@pytest.mark.parametrize("explained", [True, False])
def test_the_orjson_body_is_the_documented_response_model(explained):
    body = response_dict(_rec(explained), 7, ["gone"])
    wire = orjson.loads(orjson.dumps(body))
    model = RecommendResponse.model_validate(wire)  # the documented schema accepts it
    assert wire == orjson.loads(model.model_dump_json())  # and writes exactly the same JSON back
    assert wire["items"][0]["score"] == 0.123456789 and wire["history_length"] == 7


def test_the_batch_body_mixes_results_and_errors_in_the_documented_shape():
    from service.errors import InvalidInput

    rendered = orjson.loads(_render_batch([(_rec(True), 2, []), InvalidInput("bad k", {"k": 0})]))
    model = BatchRecommendResponse.model_validate(rendered)
    assert rendered == orjson.loads(model.model_dump_json())
    assert rendered["results"][1]["error"]["code"] == "invalid_input"


def test_non_finite_scores_are_written_as_null_like_pydantic():
    rec = Recommendation(items=[RecommendedRow("a", math.nan)], exact=False, model_version="v")
    assert orjson.loads(orjson.dumps(response_dict(rec, 1, [])))["items"][0]["score"] is None
    assert orjson.loads(RecommendResponse(**response_dict(rec, 1, [])).model_dump_json())["items"][0]["score"] is None


@pytest.mark.parametrize("enabled", [False, True])
def test_access_log_follows_the_setting(enabled):
    create_app(Settings(bundle=None, access_log=enabled))
    assert logging.getLogger("uvicorn.access").disabled is (not enabled)
    create_app(Settings(bundle=None))  # the default: off
    assert logging.getLogger("uvicorn.access").disabled
