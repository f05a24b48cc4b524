"""The published OpenAPI schema: valid, every $ref resolvable, and every limit it publishes is the limit the service
enforces under default settings (settings above the published limits are refused)."""

import pytest
from openapi_spec_validator import validate

from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def schema():
    return create_app(Settings(bundle=None)).openapi()  # the schema needs no bundle: the lifespan is not run


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_schema_validates_and_every_ref_resolves(schema):
    validate(schema)  # raises on an invalid OpenAPI 3.1 document
    components = schema.get("components", {}).get("schemas", {})
    refs = set(_refs(schema))
    assert refs, "no $ref at all: the check would prove nothing"
    missing = [r for r in refs if r.removeprefix("#/components/schemas/") not in components]
    assert not missing, f"unresolvable $ref: {missing}"


def _body(schema, path, media="application/json"):
    body = schema["paths"][path]["post"]["requestBody"]["content"][media]["schema"]
    if "$ref" in body:
        return schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    return body


def test_published_limits_are_the_enforced_defaults(schema):
    s = Settings(bundle=None)
    comp = schema["components"]["schemas"]
    rec = comp["RecommendRequest"]["properties"]
    assert rec["k"]["maximum"] == s.max_k
    history = next(v for v in rec["history"]["anyOf"] if v.get("type") == "array")
    assert history["maxItems"] == s.max_history
    assert comp["BatchRecommendRequest"]["properties"]["requests"]["maxItems"] == s.max_batch_requests
    assert comp["EventsRequest"]["properties"]["item_ids"]["maxItems"] == s.max_events
    assert _body(schema, "/v1/items")["properties"]["text"]["maxLength"] == s.max_text_chars
    assert _body(schema, "/v1/items", "multipart/form-data")["properties"]["text"]["maxLength"] == s.max_text_chars


@pytest.mark.parametrize("setting", ["max_k", "max_history", "max_batch_requests", "max_events", "max_text_chars"])
def test_a_limit_above_the_published_one_is_refused(setting, monkeypatch):
    default = Settings.model_fields[setting].default
    monkeypatch.setenv(f"MISSREC_{setting.upper()}", str(default + 1))
    with pytest.raises(ValueError, match=setting):
        Settings()
    monkeypatch.delenv(f"MISSREC_{setting.upper()}")
    with pytest.raises(ValueError, match=f"MISSREC_{setting.upper()}={default + 1} is outside"):
        create_app(Settings(bundle=None), **{setting: default + 1})  # overrides skip validation: checked again
