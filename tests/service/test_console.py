"""The web console in a real headless Chromium (Playwright), against the real service behind uvicorn: the bundle
trained on the REAL Scientific data, real Redis, real ABO photos through open_clip (tiny random-init weights).

Each view renders real data and is checked against the API; an ingest through the form becomes recommendable;
a bad image and a missing API key show readable messages. Screenshots of every view go to a temp dir, or to
docs/figures/console-*.png with ``--console-screenshots`` (how the committed figures are made).

The browser is the system's Chromium (MISSREC_CHROMIUM, else chromium on PATH; scripts/bootstrap.sh installs
Debian's when root): Playwright downloads none here. Without one the tests skip, and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.launch import InProcessServer
from tests.helpers import drop_redis_keys
from tests.paths import ROOT
from tests.service_helpers import make_app

pytestmark = pytest.mark.slow  # the process tier: a headless Chromium

KEY = "console-test-key-0123456789"
TIMEOUT_MS = 15_000


def _chromium() -> str:
    """Path of a Chromium binary, or a skip (a failure under CI) that says how to get one."""
    found = [os.environ.get("MISSREC_CHROMIUM", "")] + [shutil.which(n) or "" for n in ("chromium", "chromium-browser")]
    path = next((p for p in found if p and Path(p).is_file()), None)
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[dev]')"
    if path is None:
        problem = (
            "no Chromium found: apt-get install chromium (scripts/bootstrap.sh does when root) or set MISSREC_CHROMIUM"
        )
    if problem:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"browser tests cannot run under CI: {problem}")
        pytest.skip(problem)
    return path


@pytest.fixture(scope="module")
def service(scientific_bundle, redis_url, tiny_clip, tmp_path_factory) -> Iterator[str]:
    prefix = f"missrec-test-{uuid.uuid4().hex[:10]}"
    tmp = tmp_path_factory.mktemp("console")
    app = make_app(scientific_bundle, redis_url, prefix, tiny_clip, tmp, api_key=KEY, warmup=False)  # as test_fuzz
    with InProcessServer(app) as server:
        yield server.url
    drop_redis_keys(redis_url, prefix)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, service):
    context = browser.new_context(viewport={"width": 1280, "height": 860}, base_url=service)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()
    assert not errors, f"{len(errors)} JavaScript errors or CSP violations on the page, e.g. {sorted(set(errors))[:3]}"


@pytest.fixture(scope="module")
def shots(request, tmp_path_factory) -> Path:
    if request.config.getoption("--console-screenshots"):
        return ROOT / "docs" / "figures"
    return tmp_path_factory.mktemp("console-shots")


@pytest.fixture(scope="module")
def bundle_items(scientific_bundle) -> dict[str, str]:
    ids = json.loads((scientific_bundle / "items" / "ids.json").read_text())
    texts = json.loads((scientific_bundle / "items" / "texts.json").read_text())
    return dict(zip(ids[1:], texts[1:], strict=True))


def _api(service: str) -> httpx.Client:
    return httpx.Client(base_url=service, headers={"X-API-Key": KEY}, timeout=30)


def _listed(page, selector: str) -> list[str]:
    return page.locator(f"{selector} > li[data-item]").evaluate_all("els => els.map(e => e.dataset.item)")


def test_markup_has_landmarks_labels_and_works_from_the_keyboard(page):
    page.goto("/console/")
    for landmark in ("banner", "navigation", "main"):
        assert page.get_by_role(landmark).count() >= 1, landmark
    unlabelled = page.evaluate(
        "() => [...document.querySelectorAll('input, textarea, select')].filter(e => !e.labels.length).map(e => e.id)"
    )
    assert unlabelled == []
    assert page.locator("[aria-live]").count() >= 4
    page.locator('nav a[data-view="playground"]').focus()
    page.keyboard.press("Enter")
    page.locator("#view-playground").wait_for(state="visible")
    assert page.locator('nav a[aria-current="page"]').inner_text() == "Playground"
    page.locator("#search-q").focus()
    page.keyboard.type("glue")
    page.keyboard.press("Enter")  # the search form submits from the keyboard
    page.locator("#search-results > li[data-item]").first.wait_for()


def test_overview_shows_the_model_the_catalogue_and_live_charts(page, service, bundle_items, shots):
    page.goto("/console/#overview")
    page.locator("#model-facts dd").first.wait_for()
    model = page.locator("#model-facts").inner_text()
    assert "missrec" in model and "missrec_fusion" in model
    assert f"bundle items\n{len(bundle_items)}" in page.locator("#catalogue-facts").inner_text()
    checks = page.locator("#check-facts").inner_text()
    assert "Redis\nok" in checks and "ingestion\nok" in checks
    history = list(bundle_items)[10:14]
    with _api(service) as api:  # traffic to chart, while the page polls
        for _ in range(3):
            for i in range(8):
                assert api.post("/v1/recommend", json={"history": history[: 1 + i % 4], "k": 10}).status_code == 200
            page.wait_for_timeout(2100)
    page.wait_for_function("() => document.querySelector('[data-chart=request]').dataset.points >= 2")
    for chart in ("rate", "request", "queue", "user_tower", "search", "batch"):  # "max –": no point drawn
        caption = page.locator(f'[data-chart="{chart}"] figcaption').inner_text()
        assert "(max –)" not in caption, caption
    assert "p99" in page.locator('[data-chart="request"] figcaption').inner_text()
    assert page.locator('[data-chart="batch"] polyline').count() == 1
    page.screenshot(path=shots / "console-overview.png", full_page=False)


def test_user_view_shows_the_history_and_the_explained_top_k(page, service, scientific_dir, bundle_items, shots):
    from missrec.data.dataset import load_dataset

    ds = load_dataset(scientific_dir)
    ids = list(bundle_items)
    user = 3
    history = [ids[r - 1] for r in ds.test.histories[user, : ds.test.lengths[user]].tolist()]
    user_id = ds.user_ids[user]
    with _api(service) as api:
        assert api.post(f"/v1/users/{user_id}/events", json={"item_ids": history}).status_code == 200
        want = api.post("/v1/recommend", json={"user_id": user_id, "k": 7}).json()["items"]
        seen = api.post("/v1/recommend", json={"user_id": user_id, "k": 7, "exclude_seen": False}).json()["items"]
    page.goto("/console/#user")
    view = page.locator("#view-user")
    view.get_by_label("User id").fill(user_id)
    view.get_by_label("k", exact=True).fill("7")
    view.get_by_role("button", name="Show").click()
    page.wait_for_function("() => document.querySelectorAll('#user-recs > li[data-item]').length === 7")
    assert _listed(page, "#user-history") == history
    first = page.locator("#user-history > li").first.locator(".text").inner_text()
    assert first == bundle_items[history[0]]  # the real item text
    assert _listed(page, "#user-recs") == [i["item_id"] for i in want]
    bars = page.locator("#user-recs .bar").evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    assert len(bars) == 14 and all("share of the score" in b for b in bars)
    assert page.locator("#user-recs .cluster").first.inner_text().startswith("interest cluster ")
    because = page.locator("#user-recs .because").first.locator("a.item-id").all_inner_texts()
    assert because and set(because) <= set(history)  # the history items the first recommendation comes from
    page.screenshot(path=shots / "console-user.png", full_page=False)
    view.get_by_label("exclude seen items").uncheck()
    view.get_by_role("button", name="Show").click()
    page.wait_for_function(
        "want => [...document.querySelectorAll('#user-recs > li[data-item]')].map(e => e.dataset.item).join() === want",
        arg=",".join(i["item_id"] for i in seen),
    )


def test_playground_builds_a_history_from_search_and_recommends(page, service, shots):
    page.goto("/console/#playground")
    page.get_by_label("Search items").fill("glue")
    page.locator("#view-playground").get_by_role("button", name="Search").click()
    results = page.locator("#search-results > li[data-item]")
    results.first.wait_for()
    assert all("glue" in t.lower() for t in results.locator(".text").all_inner_texts()[:5])
    picked = _listed(page, "#search-results")[:3]
    for item in picked:
        page.get_by_role("button", name=f"Add {item} to the history").click()
        page.wait_for_function(
            "n => document.querySelectorAll('#play-history > li[data-item]').length === n", arg=picked.index(item) + 1
        )
    with _api(service) as api:
        want = [i["item_id"] for i in api.post("/v1/recommend", json={"history": picked, "k": 10}).json()["items"]]
    page.wait_for_function(
        "want => [...document.querySelectorAll('#play-recs > li[data-item]')].map(e => e.dataset.item).join() === want",
        arg=",".join(want),
    )
    assert not set(picked) & set(_listed(page, "#play-recs"))
    page.screenshot(path=shots / "console-playground.png", full_page=False)


def test_ingest_through_the_form_is_recommendable_and_errors_are_readable(page, service, abo_dir, shots, abo_products):
    product = next(p for p in abo_products if p["images"])
    item_id = f"console-{product['id']}"
    page.goto("/console/#ingest")
    view = page.locator("#view-ingest")
    view.get_by_label("Item id").fill(item_id)
    view.get_by_label("Text").fill(product["text"])
    page.locator("#ingest-image").set_input_files(str(product["images"][0]))
    view.get_by_role("button", name="Ingest").click()  # no API key yet
    alert = page.locator("#view-ingest [role=alert]")
    alert.filter(has_text="X-API-Key").wait_for()
    assert "HTTP 401" in alert.inner_text() and "Enter the API key" in alert.inner_text()

    page.get_by_label("API key").fill(KEY)
    view.get_by_role("button", name="Ingest").click()
    page.locator("#ingest-card img").wait_for()
    page.wait_for_function("() => document.querySelector('#ingest-card img').naturalWidth > 0")
    page.locator("#ingest-recs > li[data-item]").first.wait_for()
    assert alert.inner_text() == ""
    recs = _listed(page, "#ingest-recs")
    with _api(service) as api:
        want = api.post("/v1/recommend", json={"history": [item_id], "k": 10, "exclude_seen": False}).json()
        assert api.get(f"/v1/items/{item_id}").json()["source"] == "ingested"
    assert recs == [i["item_id"] for i in want["items"]] and item_id in recs  # recommendable at once
    page.screenshot(path=shots / "console-ingest.png", full_page=False)

    view.get_by_label("Item id").fill(f"{item_id}-broken")
    page.locator("#ingest-image").set_input_files(
        files=[{"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": b"this is not a JPEG at all"}]
    )
    view.get_by_role("button", name="Ingest").click()
    alert.filter(has_text="image rejected").wait_for()
    message = alert.inner_text()
    assert message.startswith("Error: image rejected:") and "HTTP 422, invalid_image" in message, message


def test_item_view_shows_how_it_was_ingested_and_its_nearest_items(
    page, service, abo_dir, bundle_items, shots, abo_products
):
    product = abo_products[-1]
    item_id = f"console-item-{product['id']}"
    with _api(service) as api, product["images"][0].open("rb") as photo:
        r = api.post("/v1/items", data={"item_id": item_id, "text": product["text"]}, files={"image": photo})
        assert r.status_code == 201, r.text
        near = api.get(f"/v1/items/{item_id}/similar", params={"k": 10}).json()["items"]
    page.goto(f"/console/#item/{item_id}")
    page.wait_for_function("() => document.querySelectorAll('#item-similar > li[data-item]').length === 10")
    card = page.locator("#item-card").inner_text()
    assert "ingested through POST /v1/items" in card and "image + text" in card and product["text"] in card
    assert "ingested at\n20" in card  # an ISO date
    assert _listed(page, "#item-similar") == [i["item_id"] for i in near] and item_id not in _listed(
        page, "#item-similar"
    )
    page.screenshot(path=shots / "console-item.png", full_page=False)
    view = page.locator("#view-item")
    view.get_by_label("Item id").fill("no-such-item")
    view.get_by_role("button", name="Show").click()
    page.locator("#view-item [role=alert]").filter(has_text="does not exist").wait_for()
    assert "HTTP 404" in page.locator("#view-item [role=alert]").inner_text()
    with _api(service) as api:  # the user view shows the stored photo of an ingested item in a history
        first = next(iter(bundle_items))
        assert api.post("/v1/users/console-photo/events", json={"item_ids": [first, item_id]}).status_code == 200
    page.goto("/console/#user")
    page.locator("#view-user").get_by_label("User id").fill("console-photo")
    page.locator("#view-user").get_by_role("button", name="Show").click()
    photo = page.locator(f'#user-history > li[data-item="{item_id}"] img')
    photo.wait_for()
    assert photo.get_attribute("alt") == f"Photo of {item_id}"
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=photo.element_handle())
    assert page.locator(f'#user-history > li[data-item="{first}"] img').count() == 0  # bundle items: no photo


def test_a_malformed_item_link_shows_an_error_and_no_script_error(page, service):
    """#item/<a broken percent-escape>: decodeURIComponent throws; the view says the link is malformed (and the
    page fixture fails on any script error)."""
    page.goto("/console/#item/%E0%A4%A")
    alert = page.locator("#view-item [role=alert]")
    alert.filter(has_text="malformed link").wait_for()
    assert "is not a percent-encoded item id" in alert.inner_text()


def test_items_whose_ids_are_dot_segments_open_in_the_item_view(page, service, abo_products):
    """The ids "." and ".." are dot segments in a URL path (the browser removes them, and %2E / %2E%2E, before
    sending): the console reads items with the id in the query, so both open with their text, photo and nearest
    items, from a link and from the form."""
    product = next(p for p in abo_products if p["images"])
    with _api(service) as api, product["images"][0].open("rb") as photo:
        r = api.post("/v1/items", data={"item_id": ".", "text": "the item called dot"}, files={"image": photo})
        assert r.status_code == 201, r.text
        r = api.post("/v1/items", json={"item_id": "..", "text": "the item called dot dot"})
        assert r.status_code == 201, r.text
        near = {i: api.get("/v1/item/similar", params={"id": i, "k": 10}).json()["items"] for i in (".", "..")}
    alert = page.locator("#view-item [role=alert]")
    for item, text in ((".", "the item called dot"), ("..", "the item called dot dot")):
        page.goto(f"/console/#item/{item}")  # what the console's own links hold (encodeURIComponent keeps dots)
        page.wait_for_function(  # the view announces the item once its nearest items are listed
            "id => document.querySelector('#announce').textContent === `item ${id}: 10 nearest items`", arg=item
        )
        assert text in page.locator("#item-card").inner_text()
        assert page.locator("#item-card dd").first.inner_text() == item  # the "id" fact
        assert _listed(page, "#item-similar") == [i["item_id"] for i in near[item]]
        assert alert.inner_text() == ""
    page.locator("#view-item").get_by_label("Item id").fill(".")
    page.locator("#view-item").get_by_role("button", name="Show").click()
    page.locator("#item-card").filter(has_text="the item called dot").locator("img").wait_for()
    page.wait_for_function("() => document.querySelector('#item-card img').naturalWidth > 0")  # /v1/item/image?id=.
    assert "dot dot" not in page.locator("#item-card").inner_text() and alert.inner_text() == ""
