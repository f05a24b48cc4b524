"""The console's shop views in a real headless Chromium: attribute chips on an item (escaped), the playground's
filter builder (its recommendations are the API's filtered ones), and the experiment panel (the counts in Redis).
Against the real Scientific bundle with attributes derived from its texts (tests/service/test_shop.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from harness.launch import InProcessServer
from tests.helpers import drop_redis_keys
from tests.service.test_console import KEY, _listed, browser, page  # noqa: F401  (the browser fixtures)
from tests.service.test_shop import attr_bundle  # noqa: F401
from tests.service_helpers import make_app

pytestmark = pytest.mark.slow  # the process tier: a headless Chromium


@pytest.fixture(scope="module")
def service(attr_bundle, redis_url, tiny_clip, tmp_path_factory) -> Iterator[str]:  # noqa: F811
    prefix = f"missrec-test-{uuid.uuid4().hex[:10]}"
    app = make_app(
        attr_bundle[0], redis_url, prefix, tiny_clip, tmp_path_factory.mktemp("c"), api_key=KEY, warmup=False
    )
    with InProcessServer(app) as server:
        yield server.url
    drop_redis_keys(redis_url, prefix)


def _api(service: str) -> httpx.Client:
    return httpx.Client(base_url=service, headers={"X-API-Key": KEY}, timeout=30)


def test_item_view_shows_escaped_attribute_chips_and_availability(page, service, attr_bundle):  # noqa: F811
    ids = attr_bundle[1]
    item = ids[9]
    with _api(service) as api:
        body = {"attributes": {"brand": "<img src=x onerror=alert(1)>", "categories": ["a & b"]}, "available": False}
        assert api.patch(f"/v1/items/{item}", json=body).status_code == 200
    page.goto(f"/console/#item/{item}")
    chips = page.locator("#item-attrs > li")
    chips.first.wait_for()
    assert chips.all_inner_texts() == ["brand: <img src=x onerror=alert(1)>", "categories: a & b", "unavailable"]
    assert page.locator("#item-attrs img").count() == 0


def test_playground_filter_builder_gives_the_filtered_recommendations(page, service, attr_bundle):  # noqa: F811
    attrs = attr_bundle[2]
    brand = max(
        {a.get("brand") for a in attrs.values()} - {None},
        key=lambda b: sum(a.get("brand") == b for a in attrs.values()),
    )
    page.goto("/console/#playground")
    page.get_by_label("Search items").fill("glue")
    page.locator("#view-playground").get_by_role("button", name="Search").click()
    page.locator("#search-results > li[data-item]").first.wait_for()
    picked = _listed(page, "#search-results")[:2]
    for n, item in enumerate(picked, 1):
        page.get_by_role("button", name=f"Add {item} to the history").click()
        page.wait_for_function("n => document.querySelectorAll('#play-history > li[data-item]').length === n", arg=n)
    page.get_by_label("Filter: field").fill("brand")
    page.get_by_label("operator").select_option("in")
    page.get_by_label("value").fill(brand)
    page.get_by_role("button", name="Add the condition").click()
    with _api(service) as api:
        f = {"op": "in", "field": "brand", "values": [brand]}
        want = api.post("/v1/recommend", json={"history": picked, "k": 10, "filter": f}).json()
    page.wait_for_function(
        "want => [...document.querySelectorAll('#play-recs > li[data-item]')].map(e => e.dataset.item).join() === want",
        arg=",".join(i["item_id"] for i in want["items"]),
    )
    assert all(attrs[i]["brand"] == brand for i in _listed(page, "#play-recs"))
    assert f"{want['matched']} items match the filter" in page.locator("#play-meta").inner_text()
    assert page.locator("#play-filters > li").all_inner_texts()[0].startswith(f"brand in {brand}")
    page.get_by_role("button", name="Remove the condition on brand").click()
    page.wait_for_function("() => !document.querySelector('#play-meta').textContent.includes('match the filter')")


def test_experiment_panel_shows_the_counts_per_variant(page, service, attr_bundle):  # noqa: F811
    variants = [{"name": "one", "bundle": "bundle", "share": 0.5}, {"name": "two", "bundle": "bundle", "share": 0.5}]
    name = f"panel{uuid.uuid4().hex[:6]}"
    with _api(service) as api:
        assert api.put(f"/v1/admin/experiments/{name}", json={"variants": variants}).status_code == 201, "start"
        for u in range(20):
            api.post(f"/v1/users/p{u}/events", json={"item_ids": [attr_bundle[1][u + 1]]})
            assert api.post("/v1/recommend", json={"user_id": f"p{u}", "k": 5}).json()["variant"] in ("one", "two")
        stats = api.get(f"/v1/admin/experiments/{name}").json()
    page.goto("/console/#experiments")
    page.locator("#api-key").fill(KEY)
    page.get_by_label("Experiment", exact=True).fill(name)
    page.locator("#view-experiments").get_by_role("button", name="Show").click()
    page.locator("#experiment-table tbody tr").nth(1).wait_for()
    rows = {
        r.get_attribute("data-variant"): r.locator("td").all_inner_texts()
        for r in page.locator("#experiment-table tbody tr").all()
    }
    for v in stats["variants"]:
        assert rows[v["name"]][3] == str(v["impressions"]) and rows[v["name"]][4] == str(v["hits"])
    assert sum(int(r[3]) for r in rows.values()) == 20
    with _api(service) as api:
        api.post(f"/v1/admin/experiments/{name}/end", json={})
