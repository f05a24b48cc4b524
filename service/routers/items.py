"""Cold-start items: POST /v1/items (multipart or JSON), GET and DELETE /v1/items/{item_id}."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from service.deps import RuntimeDep, WriteAccess
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from service.runtime import Runtime
from service.schemas import ErrorResponse, Identifier, ItemCreated, ItemJSONRequest, ItemResponse

router = APIRouter(prefix="/v1/items", tags=["items"])
ItemId = Annotated[str, Path(min_length=1, max_length=256, description="External item id.")]
_ID = TypeAdapter(Identifier)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 503)}

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["item_id"],
    "properties": {
        "item_id": {"type": "string", "minLength": 1, "maxLength": 256},
        "text": {"type": "string", "maxLength": 20000},
        "image": {"type": "string", "format": "binary"},
    },
}
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": {"$ref": "#/components/schemas/ItemJSONRequest"}},
        },
    }
}


async def _read_multipart(request: Request, runtime: Runtime) -> tuple[str, str, bytes | None]:
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=runtime.settings.max_image_bytes + 1)
    except (MultiPartException, HTTPException) as exc:  # inside an app, Starlette re-raises parser errors as 400s
        message = str(getattr(exc, "detail", exc))
        if "exceeded" in message.lower() or "too large" in message.lower():
            raise PayloadTooLarge(f"multipart part too large: {message}") from None
        raise InvalidInput(f"malformed form body: {message}") from None
    item_id, text, image = form.get("item_id"), form.get("text", ""), form.get("image")
    if not isinstance(item_id, str) or not isinstance(text, str):
        raise InvalidInput("item_id and text must be form fields, not files")
    data = None
    if isinstance(image, UploadFile):
        data = await image.read(runtime.settings.max_image_bytes + 1)
        if len(data) > runtime.settings.max_image_bytes:
            raise PayloadTooLarge(f"image is larger than {runtime.settings.max_image_bytes} bytes")
    elif image is not None and image != "":
        raise InvalidInput("image must be an uploaded file")
    return item_id, text, data


async def _read_json(request: Request, runtime: Runtime) -> tuple[str, str, bytes | None]:
    try:
        body = ItemJSONRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        problems = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"]} for e in exc.errors()]
        raise InvalidInput("request does not match the schema", {"errors": problems}) from None
    image = runtime.decode_base64_image(body.image_base64) if body.image_base64 else None
    return body.item_id, body.text, image


@router.post(
    "",
    status_code=201,
    response_model=ItemCreated,
    responses=ERRORS,
    dependencies=[WriteAccess],
    openapi_extra=_OPENAPI_BODY,
)
async def ingest_item(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """Add (or replace) an item from its image and text: open_clip + item tower, interest clusters, live index.
    201 only after the item is durable in Redis; it is recommendable at once (and on other replicas within 1 s)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):  # the latter: text only
        item_id, text, image = await _read_multipart(request, runtime)
    elif content_type == "application/json":
        item_id, text, image = await _read_json(request, runtime)
    else:
        raise UnsupportedMedia("send multipart/form-data (item_id, text, image file) or application/json")
    try:
        item_id = _ID.validate_python(item_id)
    except ValidationError:
        raise InvalidInput("item_id must be 1..256 characters without control characters") from None
    record, replaced = await runtime.ingest(item_id, text, image)
    body = ItemCreated(
        item_id=item_id,
        version=record.version,
        text_cluster=record.ints.get("text_cluster"),
        image_cluster=record.ints.get("image_cluster"),
        replaced=replaced,
    )
    # Headers are latin-1: percent-encode the id (unicode ids are valid; the raw id made a 500 after the write).
    location = f"/v1/items/{quote(item_id, safe='')}"
    return JSONResponse(status_code=201, content=body.model_dump(), headers={"Location": location})


@router.get("/{item_id:path}", response_model=ItemResponse, responses=ERRORS)
async def get_item(item_id: ItemId, runtime: RuntimeDep) -> ItemResponse:
    return ItemResponse(**runtime.item_info(item_id))


@router.delete("/{item_id:path}", status_code=204, responses=ERRORS, dependencies=[WriteAccess])
async def delete_item(item_id: ItemId, runtime: RuntimeDep) -> Response:
    """Remove an item (bundle or ingested) from recommendations at once, on every replica."""
    await runtime.delete_item(item_id)
    return Response(status_code=204)
