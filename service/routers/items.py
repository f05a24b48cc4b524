"""Items: POST /v1/items (cold start, multipart or JSON), GET /v1/items?q= (search), GET and DELETE
/v1/items/{item_id}, GET /v1/items/{item_id}/similar and /image; the same reads with the id in the query
(GET /v1/item?id=, /v1/item/similar?id=, /v1/item/image?id=) for ids a URL path cannot carry."""

from __future__ import annotations

import base64
import binascii
import codecs
from typing import Annotated, Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from service import usecases
from service.deps import JSONBody, PathUTF8, QueryUTF8, StateDep, WriteAccess, is_json_media
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from service.routers.recommend import recommended
from service.schemas import (
    MAX_K,
    MAX_QUERY_CHARS,
    MAX_SEARCH_RESULTS,
    MAX_TEXT_CHARS,
    ErrorResponse,
    Identifier,
    ItemCreated,
    ItemJSONRequest,
    ItemPatch,
    ItemResponse,
    ItemSearchResponse,
    ItemSummary,
    SimilarRequest,
    SimilarResponse,
)
from service.state import ServiceState

router = APIRouter(prefix="/v1/items", tags=["items"])
ItemId = Annotated[str, Path(min_length=1, max_length=256, description="External item id.")]
QueryItemId = Annotated[
    str,
    Query(
        alias="id",
        min_length=1,
        max_length=256,
        description="External item id, percent-encoded like any query value (any id, `.` and `..` included).",
    ),
]
SimilarK = Annotated[int | None, Query(ge=1, le=MAX_K, description="Items returned (default 10).")]
Explain = Annotated[bool, Query(description="Add text/image weights and the interest cluster per item.")]
_ID = TypeAdapter(Identifier)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 501, 503)}

_FORM_FIELDS = ("item_id", "text", "image", "attributes", "available")
_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["item_id"],
    "properties": {
        "item_id": {"type": "string", "minLength": 1, "maxLength": 256},
        "text": {"type": "string", "maxLength": MAX_TEXT_CHARS},
        "image": {"type": "string", "format": "binary"},
        "attributes": {"type": "string", "description": "A JSON object: the item's attribute values."},
        "available": {"type": "string", "enum": ["true", "false"]},
    },
}
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            # inline (the route reads the body itself, so FastAPI would not add the model to components)
            "application/json": {"schema": ItemJSONRequest.model_json_schema()},
        },
    }
}


async def _read_multipart(request: Request, state: ServiceState) -> tuple[Any, ...]:
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=state.settings.max_image_bytes + 1)
    except (MultiPartException, HTTPException) as exc:  # inside an app, Starlette re-raises parser errors as 400s
        message = str(getattr(exc, "detail", exc))
        too_large = getattr(exc, "status_code", None) == 413  # the body limit, tripped while streaming
        if too_large or "exceeded" in message.lower() or "too large" in message.lower():
            raise PayloadTooLarge(f"multipart part too large: {message}") from None
        raise InvalidInput(f"malformed form body: {message}") from None
    names = [name for name, _ in form.multi_items()]
    if unknown := sorted(set(names) - set(_FORM_FIELDS)):
        raise InvalidInput(
            f"unknown form field(s) {', '.join(unknown)}; the fields are {', '.join(_FORM_FIELDS)}",
            {"unknown_fields": unknown},
        )
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise InvalidInput(f"form field(s) {', '.join(repeated)} given more than once", {"repeated_fields": repeated})
    item_id, text, image = form.get("item_id"), form.get("text", ""), form.get("image")
    raw_attrs, raw_available = form.get("attributes"), form.get("available", "true")
    if not all(isinstance(v, str | None) for v in (item_id, text, raw_attrs, raw_available)) or item_id is None:
        raise InvalidInput("item_id, text, attributes and available must be form fields, not files")
    if raw_available not in ("true", "false"):
        raise InvalidInput("available must be true or false", {"available": raw_available})
    attributes = None
    if raw_attrs:
        try:
            attributes = orjson.loads(raw_attrs)
        except orjson.JSONDecodeError:
            raise InvalidInput("attributes must be a JSON object", code="invalid_attributes") from None
    data = None
    if isinstance(image, UploadFile):
        data = await _image_bytes(image, state.settings.max_image_bytes)
    elif image is not None and image != "":
        raise InvalidInput("image must be an uploaded file")
    return item_id, text, data, attributes, raw_available == "true"


async def _read_json(request: Request, state: ServiceState) -> tuple[Any, ...]:
    """As the other JSON routes read theirs: a UTF-8 BOM is accepted, errors have the same shape."""
    raw = await request.body()
    try:
        body = ItemJSONRequest.model_validate_json(raw.removeprefix(codecs.BOM_UTF8))
    except ValidationError as exc:
        problems = [
            {"loc": ["body", *(str(p) for p in e["loc"])], "msg": e["msg"], "type": e["type"]} for e in exc.errors()
        ]
        raise InvalidInput("request does not match the schema", {"errors": problems}) from None
    image = await _image_bytes(body.image_base64, state.settings.max_image_bytes) if body.image_base64 else None
    return body.item_id, body.text, image, body.attributes, body.available


async def _image_bytes(upload: UploadFile | str, limit: int) -> bytes:
    """An uploaded image's bytes, from a multipart file or base64 text: the one place their size is checked (413
    above ``limit``, MISSREC_MAX_IMAGE_BYTES). Neither reader takes in more than the limit allows: a file is read up
    to one byte past it, base64 longer than ``limit`` bytes can encode is not decoded."""
    data = None
    if isinstance(upload, UploadFile):
        data = await upload.read(limit + 1)
    elif len(upload) <= (limit * 4) // 3 + 8:
        try:
            data = base64.b64decode(upload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("image_base64 is not valid base64") from None
    if data is None or len(data) > limit:
        raise PayloadTooLarge(f"image is larger than {limit} bytes")
    return data


@router.post(
    "",
    status_code=201,
    response_model=ItemCreated,
    responses=ERRORS,
    dependencies=[WriteAccess],
    openapi_extra=_OPENAPI_BODY,
)
async def ingest_item(request: Request, state: StateDep) -> JSONResponse:
    """Add (or replace) an item from its image and text: CLIP + item tower, interest clusters, live index.
    201 only after the item is durable in Redis; it is recommendable at once (and on other replicas within 1 s)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):  # the latter: text only
        item_id, text, image, attributes, available = await _read_multipart(request, state)
    elif is_json_media(content_type):
        item_id, text, image, attributes, available = await _read_json(request, state)
    else:
        raise UnsupportedMedia("send multipart/form-data (item_id, text, image file) or application/json")
    try:
        item_id = _ID.validate_python(item_id)
    except ValidationError:
        raise InvalidInput("item_id must be 1..256 characters without control characters") from None
    record, replaced = await usecases.ingest(state, item_id, text, image, attributes, available)
    body = ItemCreated(
        item_id=item_id,
        version=record.version,
        text_cluster=record.ints.get("text_cluster"),
        image_cluster=record.ints.get("image_cluster"),
        replaced=replaced,
    )
    # Headers are latin-1: percent-encode the id (unicode ids are valid; the raw id made a 500 after the write).
    location = f"/v1/items/{quote(item_id, safe='')}"
    if item_id in (".", ".."):  # a literal dot segment would be removed by clients resolving the URL
        location = "/v1/items/" + "%2E" * len(item_id)
    return JSONResponse(status_code=201, content=body.model_dump(), headers={"Location": location})


@router.get("", response_model=ItemSearchResponse, responses=ERRORS)
async def search_items(
    state: StateDep,
    q: Annotated[
        str, Query(min_length=1, max_length=MAX_QUERY_CHARS, description="Words that must all occur in the text or id.")
    ],
    limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_RESULTS, description="Most items returned.")] = 20,
) -> ItemSearchResponse:
    """Live items whose id or text contains every word of ``q`` (case-insensitive): an exact id first, then
    texts holding the whole query as a phrase, then the others, in catalogue order. A linear scan of the item
    texts, meant for the console and for debugging, not a search engine."""
    items, total = await usecases.search_items(state, q, limit)
    return ItemSearchResponse(query=q, items=[ItemSummary(**i) for i in items], total=total)


SIMILAR_DESCRIPTION = """The k live items nearest to one item **by the model's own scorer**, the item itself excluded.

The query is the item's own vector: for MISSRec (`missrec_fusion`) its static vector (the mean of its unit text and
image vectors, and of its ID vector in transductive mode; what the index stores for it) scaled to unit norm like a
user vector, scored against every item with the dynamic fusion (the scores are the fused scores a user whose
vector were this item would get); for `inner_product` bundles the item vector. The same exact top-k as
recommendations: deleted items never appear, exactly min(k, live items - 1) items come back, best first, and
`exact` says whether the list is proven equal to brute-force scoring. (The id is the path up to the last
`/similar`: an item whose own id ends in `/similar` or `/image` is served by these routes, not by
GET /v1/items/{item_id}.)"""


@router.get(
    "/{item_id:path}/similar",
    response_model=SimilarResponse,
    responses=ERRORS,
    dependencies=[PathUTF8],
    description=SIMILAR_DESCRIPTION,
)
async def similar_items(
    item_id: ItemId, state: StateDep, k: SimilarK = None, explain: Explain = False
) -> SimilarResponse:
    rec = await usecases.similar_items(state, item_id, k, explain)
    return SimilarResponse(item_id=item_id, items=recommended(rec), model_version=rec.model_version, exact=rec.exact)


@router.post(
    "/{item_id:path}/similar",
    response_model=SimilarResponse,
    responses=ERRORS,
    dependencies=[PathUTF8, JSONBody],
    description=SIMILAR_DESCRIPTION + "\n\nThe POST form takes a `filter` and `max_per` as in POST /v1/recommend.",
)
async def similar_items_filtered(item_id: ItemId, body: SimilarRequest, state: StateDep) -> SimilarResponse:
    rec = await usecases.similar_items(state, item_id, body.k, body.explain, body)
    return SimilarResponse(
        item_id=item_id, items=recommended(rec), model_version=rec.model_version, exact=rec.exact, matched=rec.matched
    )


@router.get(
    "/{item_id:path}/image",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail."}, **ERRORS},
    dependencies=[PathUTF8],
)
async def item_image(item_id: ItemId, state: StateDep) -> Response:
    """A thumbnail (JPEG, at most 192 px) of an ingested item's image; 404 ``no_image`` when none is stored
    (bundle items have features only)."""
    return Response(usecases.item_thumbnail(state, item_id), media_type="image/jpeg")


@router.get("/{item_id:path}", response_model=ItemResponse, responses=ERRORS, dependencies=[PathUTF8])
async def get_item(item_id: ItemId, state: StateDep) -> ItemResponse:
    return ItemResponse(**usecases.item_info(state, item_id))


@router.patch(
    "/{item_id:path}", response_model=ItemResponse, responses=ERRORS, dependencies=[WriteAccess, PathUTF8, JSONBody]
)
async def patch_item(item_id: ItemId, body: ItemPatch, state: StateDep) -> ItemResponse:
    """Change an item's attributes (all of them) and/or availability without re-embedding it: durable in Redis
    before the answer, on every replica within 1 s. An unavailable item is kept (and comes back as it was) but is
    never recommended nor returned by /similar."""
    return ItemResponse(**await usecases.patch_item(state, item_id, body.attributes, body.available))


@router.delete("/{item_id:path}", status_code=204, responses=ERRORS, dependencies=[WriteAccess, PathUTF8])
async def delete_item(item_id: ItemId, state: StateDep) -> Response:
    """Remove an item (bundle or ingested) from recommendations at once, on every replica."""
    await usecases.delete_item(state, item_id)
    return Response(status_code=204)


# ----- the same reads with the id in the query ------------------------------------------------------------------
# A URL path cannot carry the ids "." and "..": URL parsers (browsers' fetch, curl, most HTTP libraries) remove
# them, and their percent-encodings %2E / %2E%2E, as dot segments before the request is sent. These routes answer
# exactly what the path routes answer (they call them), so the console fetches every item this way.
by_query = APIRouter(prefix="/v1/item", tags=["items"])
BY_QUERY = "\n\nThe id is in the query (`?id=`), so any id can be named, `.` and `..` included."


@by_query.get(
    "",
    response_model=ItemResponse,
    responses=ERRORS,
    dependencies=[QueryUTF8],
    description="What GET /v1/items/{item_id} answers." + BY_QUERY,
)
async def get_item_by_query(item_id: QueryItemId, state: StateDep) -> ItemResponse:
    return await get_item(item_id, state)


@by_query.get(
    "/similar",
    response_model=SimilarResponse,
    responses=ERRORS,
    dependencies=[QueryUTF8],
    description="What GET /v1/items/{item_id}/similar answers." + BY_QUERY,
)
async def similar_items_by_query(
    item_id: QueryItemId, state: StateDep, k: SimilarK = None, explain: Explain = False
) -> SimilarResponse:
    return await similar_items(item_id, state, k, explain)


@by_query.get(
    "/image",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail."}, **ERRORS},
    dependencies=[QueryUTF8],
    description="What GET /v1/items/{item_id}/image answers." + BY_QUERY,
)
async def item_image_by_query(item_id: QueryItemId, state: StateDep) -> Response:
    return await item_image(item_id, state)
