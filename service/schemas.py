"""Request and response schemas (pydantic v2), split by direction; every field is bounded at the edge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

from service.filters import (
    FILTER_DESCRIPTION,
    FILTER_SCHEMA_EXTRA,
    MAX_PER_DESCRIPTION,
    MAX_PER_FIELDS,
    FieldName,
    Filter,
    check_bounds,
)

# External ids: 1..256 characters, no C0 or C1 control characters, not only blanks (unicode is fine).
Identifier = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=256,
        pattern=r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$",
    ),
]
# The published limits (the OpenAPI schema); Settings may lower them, never raise them (refused at start-up).
MAX_K = 1000
MAX_HISTORY = 1000
MAX_EXCLUDE = 1000
MAX_BATCH_REQUESTS = 256
MAX_EVENTS = 1000
MAX_TEXT_CHARS = 4096
MAX_SEARCH_RESULTS = 100  # GET /v1/items?q=...: most items one search returns
MAX_QUERY_CHARS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


BoundedFilter = Annotated[Filter | None, AfterValidator(check_bounds)]
Cap = Annotated[int, Field(ge=1, le=MAX_K, strict=True)]
MaxPer = Annotated[dict[FieldName, Cap], Field(max_length=MAX_PER_FIELDS)]


class Shaping(_Strict):
    """What every top-k request may add: a filter over item attributes and a cap per field value."""

    filter: BoundedFilter = Field(None, description=FILTER_DESCRIPTION, json_schema_extra=FILTER_SCHEMA_EXTRA)
    max_per: MaxPer | None = Field(None, description=MAX_PER_DESCRIPTION, examples=[{"brand": 2}])


# ----- requests -------------------------------------------------------------------------------------------------


class RecommendRequest(Shaping):
    """Top-k for a user: by ``user_id`` (history read from Redis) or by an explicit ``history`` (oldest first)."""

    user_id: Identifier | None = Field(None, examples=["u1"])
    history: list[Identifier] | None = Field(None, max_length=MAX_HISTORY, examples=[["i1", "i2"]])
    k: int = Field(10, ge=1, le=MAX_K, strict=True)  # strict: "5" and true are errors, not 5 and 1
    exclude_seen: bool = Field(True, strict=True, description="Leave out the items of the history.")
    exclude: list[Identifier] = Field(default_factory=list, max_length=MAX_EXCLUDE)
    explain: bool = Field(
        False,
        strict=True,
        description="Explain each item: the split of its score by modality, the history items it comes from "
        "(leave-one-out contributions), fusion weights and interest cluster. Costs one extra user-tower pass.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RecommendRequest:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


@dataclass(frozen=True)
class InvalidSubRequest:
    """A batch entry that does not match RecommendRequest: answered with a per-item error, not a failed batch."""

    errors: list[dict[str, Any]]


def _per_item(value: Any, handler: ValidatorFunctionWrapHandler) -> RecommendRequest | InvalidSubRequest:
    try:
        return handler(value)
    except ValidationError as exc:
        return InvalidSubRequest(
            [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        )


class BatchRecommendRequest(_Strict):
    requests: list[Annotated[RecommendRequest, WrapValidator(_per_item)]] = Field(
        min_length=1, max_length=MAX_BATCH_REQUESTS
    )


class EventsRequest(_Strict):
    """Interactions to append to a user's history, oldest first."""

    item_ids: list[Identifier] = Field(min_length=1, max_length=MAX_EVENTS)
    timestamps: list[Annotated[float, Field(ge=0, le=1e11)]] | None = Field(
        None,
        description="Unix seconds, one per item id (optional), stored as given. The history keeps arrival "
        "order: a back-filled older event still counts as the most recent.",
    )
    idempotency_key: Identifier | None = Field(
        None, description="Retries with the same key are applied once (also accepted as the Idempotency-Key header)."
    )
    recommendation_id: Identifier | None = Field(
        None,
        description="The recommendation these interactions follow (an experiment's attribution); without it, "
        "the user's most recent one within the attribution window.",
    )

    @model_validator(mode="after")
    def _aligned(self) -> EventsRequest:
        if self.timestamps is not None and len(self.timestamps) != len(self.item_ids):
            raise ValueError("timestamps must have one entry per item id")
        return self


class ItemJSONRequest(_Strict):
    """Cold-start item as JSON; the image is base64 (never a URL: the service fetches nothing)."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"item_id": "new-item-1", "text": "Cordless drill. Tools. Acme."}]},
    )

    item_id: Identifier
    text: str = Field("", max_length=MAX_TEXT_CHARS)
    image_base64: str | None = Field(None, description="Base64 image bytes (JPEG, PNG, WEBP, GIF, BMP).")
    attributes: dict[str, Any] | None = Field(None, description="Values of the bundle's attribute fields.")
    available: bool = Field(True, strict=True, description="False: kept, never recommended until made available.")


class ItemPatch(_Strict):
    """PATCH /v1/items/{id}: attributes (replacing all of them) and/or availability; nothing is re-embedded."""

    attributes: dict[str, Any] | None = Field(None, description="The item's attributes (all of them).")
    available: bool | None = Field(None, strict=True, description="False: never recommended nor similar.")


class SimilarRequest(Shaping):
    k: int | None = Field(None, ge=1, le=MAX_K, strict=True, description="Items returned (default 10).")
    explain: bool = Field(False, strict=True)


# ----- responses ------------------------------------------------------------------------------------------------


class ScorePart(BaseModel):
    part: str = Field(description="A part of the score: a modality (`text`, `image`), `id` (transductive MISSRec).")
    score: float = Field(description="This part's additive term; the parts sum to the item's score.")
    share: float = Field(description="score / the item's score: the shares sum to 1 (negative: it pulls down).")


class BecauseItem(BaseModel):
    item_id: str = Field(description="A history item behind this recommendation.")
    position: int = Field(description="Its place in the history used (oldest first, 0-based; skipped ids excluded).")
    contribution: float = Field(
        description="How much the item's score drops when this history item is left out (the same user tower and "
        "scorer on the history without it): positive = it pushed the recommendation up."
    )


class Explanation(BaseModel):
    text_weight: float | None = Field(
        description="Fusion weight of the text side (MISSRec: dynamic-fusion softmax weight, not a share of the "
        "score: see score_split; inner_product models: the text block's share of the score; null: the model's "
        "score has no sides to weigh, e.g. MMSRec's one cosine)."
    )
    image_weight: float | None = Field(description="Fusion weight of the image side (as text_weight).")
    interest: int | None = Field(
        None, description="Interest cluster of the modality that carries more weight (models with interests)."
    )
    score_split: list[ScorePart] = Field(
        default_factory=list, description="The score split into its additive parts: the actual modality shares."
    )
    because: list[BecauseItem] | None = Field(
        None,
        description="Up to 3 history items with the largest leave-one-out contributions, largest first ([] for a "
        "one-item history; absent where there is no history, e.g. similar items).",
    )


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    explanation: Explanation | None = None


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    model_version: str
    fallback: Literal["popular"] | None = Field(None, description="'popular' when there was no history to use.")
    exact: bool = Field(description="True when the top-k is provably the model's exact full-catalogue top-k.")
    history_length: int
    matched: int | None = Field(None, description="With a filter: live available items matching it.")
    recommendation_id: str | None = Field(None, description="While an experiment runs: this recommendation's id.")
    variant: str | None = Field(None, description="While an experiment runs: the user's variant.")
    skipped_item_ids: list[str] = Field(
        default_factory=list,
        description="History ids left out because the items were deleted (and, in a stored history, unknown ids).",
    )


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BatchRecommendResponse(BaseModel):
    results: list[RecommendResponse | ErrorResponse]


class EventsResponse(BaseModel):
    user_id: str
    history_length: int
    appended: int
    duplicate: bool = Field(False, description="True when this idempotency key was already applied.")


class HistoryResponse(BaseModel):
    user_id: str
    item_ids: list[str]
    timestamps: list[float | None]


class ItemCreated(BaseModel):
    item_id: str
    version: int
    text_cluster: int | None
    image_cluster: int | None
    replaced: bool


class ItemResponse(BaseModel):
    item_id: str
    source: Literal["bundle", "ingested"]
    text: str | None
    version: int | None = None
    text_cluster: int | None = None
    image_cluster: int | None = None
    created_at: float | None = None
    has_image: bool = Field(False, description="True when a thumbnail of the ingested image is stored (GET .../image).")
    attributes: dict[str, Any] = Field(default_factory=dict)
    available: bool = True


class ItemSummary(BaseModel):
    item_id: str
    source: Literal["bundle", "ingested"]
    text: str | None


class ItemSearchResponse(BaseModel):
    query: str
    items: list[ItemSummary]
    total: int = Field(description="Live items whose text or id matches every word of the query.")


class SimilarResponse(BaseModel):
    item_id: str
    items: list[RecommendedItem]
    model_version: str
    exact: bool = Field(description="True when the list is provably the scorer's exact top-k over the catalogue.")
    matched: int | None = Field(None, description="With a filter: live available items matching it.")


class Histogram(BaseModel):
    """A Prometheus histogram as JSON: cumulative counts per upper bound (the last count is the +Inf bucket)."""

    upper_bounds: list[float]
    cumulative_counts: list[int]
    count: int
    sum: float


class ModelStatus(BaseModel):
    kind: str
    version: str
    scorer: str
    modalities: list[str]
    max_history_used: int = Field(description="The model reads the last this-many items of a history.")


class CatalogueStatus(BaseModel):
    bundle_items: int
    ingested: int = Field(description="Live ingested items.")
    deleted: int = Field(description="Item ids deleted (bundle or ingested) and not ingested again.")
    live: int = Field(description="Items servable now.")
    seq: int = Field(description="Catalogue version: +1 per published change.")


class StatusResponse(BaseModel):
    """What the console's overview shows: the model, the catalogue, the checks of /readyz and the service's own
    metrics (the same numbers /metrics exposes in the Prometheus text format)."""

    model: ModelStatus
    catalogue: CatalogueStatus
    checks: dict[str, str]
    uptime_seconds: float
    requests: dict[str, int] = Field(description="Requests per route template since start (all statuses).")
    errors: int = Field(description="Responses with a 4xx or 5xx status since start.")
    stages: dict[str, Histogram] = Field(description="missrec_stage_seconds per stage.")
    batch_size: Histogram
    ingest: dict[str, int]


class Health(BaseModel):
    status: Literal["ok", "unready"]
    checks: dict[str, str] = Field(default_factory=dict)


# ----- admin: the serving bundle -------------------------------------------------------------------------------


class SwapRequest(_Strict):
    """The bundle every replica should serve: a directory inside MISSREC_BUNDLE_ROOT (relative paths: to it)."""

    bundle: str = Field(min_length=1, max_length=4096, description="Bundle directory.")


class ShadowRequest(_Strict):
    """A candidate bundle to score beside the serving one on a fraction of this replica's recommendations."""

    bundle: str = Field(min_length=1, max_length=4096, description="Bundle directory inside MISSREC_BUNDLE_ROOT.")
    fraction: float = Field(0.1, gt=0.0, le=1.0, description="Share of recommend requests scored by the candidate.")


ExperimentName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class Variant(_Strict):
    name: ExperimentName
    bundle: str = Field(min_length=1, max_length=4096, description="Bundle directory inside MISSREC_BUNDLE_ROOT.")
    share: float = Field(gt=0.0, le=1.0, description="Share of users (the shares sum to 1).")


class ExperimentRequest(_Strict):
    variants: list[Variant] = Field(min_length=2, max_length=8)

    @model_validator(mode="after")
    def _shares(self) -> ExperimentRequest:
        if abs(sum(v.share for v in self.variants) - 1.0) > 1e-6:
            raise ValueError("the variants' shares must sum to 1")
        if len({v.name for v in self.variants}) != len(self.variants):
            raise ValueError("variant names must differ")
        return self


class ExperimentEnd(_Strict):
    promote: bool = Field(False, description="Swap every replica to the variant with the highest hit rate.")


class ShadowStatus(BaseModel):
    state: Literal["off", "loading", "active", "failed"]
    bundle: str | None
    version: str | None = Field(description="The candidate's model_version (never returned to clients).")
    fraction: float
    scored: int = Field(description="Requests scored by the candidate since it was set.")
    mean_overlap: float | None = Field(description="Mean overlap@k of the serving and candidate top-k.")
    mean_seconds: dict[str, float] | None = Field(description="Mean user tower + search seconds per model.")
    error: str | None


class BundleAnnouncement(BaseModel):
    generation: int = Field(description="Order of announcements: the highest is the one every replica serves.")
    bundle: str = Field(description="The resolved bundle directory.")
    version: str = Field(description="The bundle's model_version (what responses carry once switched).")
    at: float = Field(description="Unix seconds of the announcement.")
    by: str = Field(description="The replica that announced it.")


class ActiveBundle(BaseModel):
    bundle: str
    version: str
    generation: int = Field(description="Announcement served (0: MISSREC_BUNDLE, nothing announced yet).")
    since: float


class BundleStatus(BaseModel):
    replica: str
    state: Literal["active", "loading", "failed"] = Field(
        description="loading: the announced bundle is being loaded; failed: it was refused (see error) and the "
        "active one keeps serving; active: serving the announced bundle (or the start-up one)."
    )
    active: ActiveBundle
    announced: BundleAnnouncement | None
    loading: BundleAnnouncement | None
    error: str | None
    last_swap_seconds: float | None = Field(description="Announcement seen -> serving, of the last swap here.")
