"""Security: the API key guards every write route, the service fetches no URL (no SSRF), and logs at DEBUG level
never carry the API key or image bytes (real bundle, real Redis, real ABO photos through open_clip)."""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from tests.helpers import drop_redis_keys
from tests.service_helpers import make_app

KEY = f"key-{uuid.uuid4().hex}"
READ_ONLY_POSTS = {"/v1/recommend", "/v1/recommend/batch", "/v1/items/{item_id}/similar"}  # a history or a filter
# can be long
GUARDED = {
    ("POST", "/v1/users/{user_id}/events"),
    ("POST", "/v1/items"),
    ("DELETE", "/v1/items/{item_id}"),
    ("POST", "/v1/admin/bundle"),  # admin: also 403 without MISSREC_API_KEY (tests/service/test_swap.py)
    ("PUT", "/v1/admin/shadow"),  # admin (tests/service/test_shadow.py)
    ("DELETE", "/v1/admin/shadow"),
    ("PATCH", "/v1/items/{item_id}"),  # attributes and availability (tests/service/test_shop.py)
    ("PUT", "/v1/admin/experiments/{name}"),  # admin (tests/service/test_experiments.py)
    ("POST", "/v1/admin/experiments/{name}/end"),
}


@pytest.fixture(scope="module")
def keyed_app(scientific_bundle, redis_url, tiny_clip, tmp_path_factory):
    prefix = f"missrec-test-{uuid.uuid4().hex[:10]}"
    app = make_app(scientific_bundle, redis_url, prefix, tiny_clip, tmp_path_factory.mktemp("sec"), api_key=KEY)
    yield app
    drop_redis_keys(redis_url, prefix)


def _concrete(path: str) -> str:
    return path.replace("{user_id}", "sec-user").replace("{item_id}", "no-such-item").replace("{name}", "sec-exp")


def test_every_write_route_needs_the_api_key(keyed_app):
    spec = keyed_app.openapi()
    writes = {
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        for method in operations
        if method in {"post", "put", "patch", "delete"} and path not in READ_ONLY_POSTS
    }
    assert writes == GUARDED, "a new write route: guard it with WriteAccess and list it here"
    for method, path in writes:  # and the schema tells clients so
        params = spec["paths"][path][method.lower()].get("parameters", [])
        assert any(p["in"] == "header" and p["name"].lower() == "x-api-key" for p in params), (method, path)
    wrong = "x" * len(KEY)  # same length: only the content differs
    with TestClient(keyed_app) as client:
        for method, path in sorted(writes):
            for headers in ({}, {"X-API-Key": wrong}, {"X-API-Key": KEY[:-1]}, {"X-API-Key": ""}):
                r = client.request(method, _concrete(path), json={}, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "ApiKey"
                assert KEY not in r.text and wrong not in r.text
        # the right key passes the guard (then the body is checked: 422, not 401)
        for method, path in sorted(writes):
            r = client.request(method, _concrete(path), json={}, headers={"X-API-Key": KEY})
            assert r.status_code != 401, (method, path, r.text)
        # reads stay open
        assert client.get("/v1/users/sec-user/history").status_code == 200
        assert client.get("/v1/item", params={"id": "B00O47ILVA"}).status_code == 200
        assert client.get("/v1/item/similar", params={"id": "B00O47ILVA"}).status_code == 200
        assert client.post("/v1/recommend", json={"history": ["B00O47ILVA"], "k": 2}).status_code == 200


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_a_blank_api_key_is_refused_at_start_up(blank, scientific_bundle, redis_url, tiny_clip, tmp_path, monkeypatch):
    """MISSREC_API_KEY= (an empty variable or Kubernetes secret) would turn the admin routes on and let an absent
    X-API-Key compare equal to it: refused by the settings, by the app, and by `missrec serve` in one line."""
    from pydantic import SecretStr, ValidationError
    from typer.testing import CliRunner

    from missrec_cli.main import app as cli
    from service.app import create_app
    from service.settings import Settings

    monkeypatch.setenv("MISSREC_API_KEY", blank)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert [e["loc"] for e in refused.value.errors()] == [("api_key",)]
    monkeypatch.delenv("MISSREC_API_KEY")
    settings = Settings(bundle=scientific_bundle, redis_url=redis_url, data_dir=tmp_path)
    with pytest.raises(ValueError, match="MISSREC_API_KEY"):  # settings built with overrides skip validation
        create_app(settings.model_copy(update={"api_key": SecretStr(blank)}))
    env = {"MISSREC_API_KEY": blank, "MISSREC_REDIS_URL": redis_url, "MISSREC_DATA_DIR": str(tmp_path)}
    r = CliRunner().invoke(cli, ["serve", "--bundle", str(scientific_bundle), "--port", "1"], env=env)
    assert r.exit_code == 2, r.output
    assert "MISSREC_API_KEY" in r.stderr and "refusing to start" in r.stderr


class _Listener:
    """A real TCP server on a free port that counts the connections it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_no_server_side_url_fetching(keyed_app, abo_dir):
    listener = _Listener()
    url = f"http://127.0.0.1:{listener.port}/photo.jpg"
    svg = f'<svg xmlns="http://www.w3.org/2000/svg"><image href="{url}" width="9" height="9"/></svg>'.encode()
    auth = {"X-API-Key": KEY}
    try:
        # the probe works: a plain connection to the listener is counted
        socket.create_connection(("127.0.0.1", listener.port), timeout=2).close()
        deadline = time.monotonic() + 2
        while listener.connections < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.connections == 1
        with TestClient(keyed_app) as client:
            attempts = [
                client.post("/v1/items", json={"item_id": "ssrf-1", "text": "t", "image_url": url}, headers=auth),
                client.post("/v1/items", json={"item_id": "ssrf-2", "text": "t", "image_base64": url}, headers=auth),
                client.post("/v1/items", data={"item_id": "ssrf-3", "text": "t", "image": url}, headers=auth),
                client.post(
                    "/v1/items",
                    data={"item_id": "ssrf-4", "text": "t"},
                    files={"image": ("x.svg", svg, "image/svg+xml")},
                    headers=auth,
                ),
            ]
            for r in attempts:
                assert r.status_code == 422, r.text
                assert r.json()["error"]["code"] in {"invalid_input", "invalid_image"}
            # a URL in the text is just text: stored, embedded, never followed
            r = client.post("/v1/items", json={"item_id": "ssrf-5", "text": f"see {url}"}, headers=auth)
            assert r.status_code == 201, r.text
        time.sleep(0.3)
        assert listener.connections == 1, "the service connected to a URL taken from a request"
    finally:
        listener.close()


def test_logs_never_contain_the_api_key_or_image_bytes(keyed_app, abo_dir, caplog):
    photo = sorted(abo_dir.glob("*/*.jpg"))[0].read_bytes()
    encoded = base64.b64encode(photo).decode()
    wrong = f"wrong-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)  # every logger, DEBUG and up
    with TestClient(keyed_app) as client:
        auth = {"X-API-Key": KEY}
        r = client.post(
            "/v1/items",
            data={"item_id": "log-1", "text": "a photo"},
            files={"image": ("p.jpg", photo, "image/jpeg")},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        r = client.post("/v1/items", json={"item_id": "log-2", "text": "t", "image_base64": encoded}, headers=auth)
        assert r.status_code == 201, r.text
        bad = base64.b64encode(photo[: len(photo) // 2]).decode()  # a rejected (truncated) image
        r = client.post("/v1/items", json={"item_id": "log-3", "text": "t", "image_base64": bad}, headers=auth)
        assert r.status_code == 422
        assert (
            client.post("/v1/items", json={"item_id": "log-4", "text": "t"}, headers={"X-API-Key": wrong}).status_code
            == 401
        )
        assert (
            client.post("/v1/users/log-user/events", json={"item_ids": ["B00O47ILVA"]}, headers=auth).status_code == 200
        )
    text = caplog.text
    assert len(caplog.records) > 10, "nothing was logged: the check below would prove nothing"
    assert KEY not in text and wrong not in text
    middle = len(photo) // 2
    for chunk in (
        encoded[1000:1064],
        bad[1000:1064],
        repr(photo[middle : middle + 32])[2:-1],
        photo[middle : middle + 32].hex(),
    ):
        assert chunk not in text
