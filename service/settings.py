"""Service settings: one pydantic-settings class (env prefix MISSREC_), reached through a cached getter."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.schemas import MAX_BATCH_REQUESTS, MAX_EVENTS, MAX_HISTORY, MAX_K, MAX_TEXT_CHARS

BLANK_KEY = (
    "the API key is set but blank (an empty variable or secret would open the write and admin routes to anyone): "
    "set a secret, or unset MISSREC_API_KEY"
)


class Settings(BaseSettings):
    """Every knob of the service. Each field is read from ``MISSREC_<FIELD>`` (e.g. ``MISSREC_REDIS_URL``)."""

    model_config = SettingsConfigDict(env_prefix="MISSREC_", env_file=None, extra="ignore")

    # --- artefacts --------------------------------------------------------------------------------------
    bundle: Path | None = Field(None, description="Serving bundle directory (from `missrec export`).")
    data_dir: Path = Field(Path("var"), description="Local state: embedded Redis files, quick-start bundle.")
    bundle_root: Path | None = Field(
        None,
        description="Directory every bundle a swap (POST /v1/admin/bundle) names must resolve inside (symlinks "
        "followed); unset = the directory that holds MISSREC_BUNDLE (the bundle itself when that is /).",
    )

    # --- Redis ---------------------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="redis:// or rediss:// URL; unset = start an embedded Redis under data_dir."
    )
    redis_cluster: bool = Field(False, description="Connect with the Redis Cluster client.")
    key_prefix: str = Field("missrec", description="Prefix of every Redis key.", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    history_ttl_seconds: int | None = Field(None, ge=1, description="Expire idle user histories (unset = keep).")
    attribution_window_seconds: int = Field(
        3600,
        ge=1,
        le=30 * 86400,
        description="An event without a recommendation_id is attributed to the user's "
        "most recent recommendation of the running experiment within this window (service.experiments).",
    )
    redis_timeout_seconds: float = Field(0.5, gt=0, le=30, description="Socket timeout of every Redis call.")
    embedded_redis_fsync: Literal["always", "everysec"] = Field(
        "always", description="appendfsync of the embedded Redis (always: no acknowledged write is lost)."
    )
    stream_max_len: int = Field(100_000, ge=1000, description="Approximate cap of the item-event stream.")

    # --- model runtime ---------------------------------------------------------------------------------------
    onnx_provider: Literal["auto", "cpu", "cuda"] = "auto"
    onnx_threads: int = Field(0, ge=0, le=256, description="ONNX Runtime intra-op threads (0 = library default).")
    onnx_spinning: bool = Field(
        False,
        description="Let ONNX Runtime's intra-op threads busy-wait for work (off: spinning threads take the CPU the "
        "event loop and queued requests need; no effect with MISSREC_ONNX_THREADS=1).",
    )
    onnx_optimisation: Literal["basic", "extended", "all"] = Field(
        "basic",
        description="ONNX Runtime graph optimisation level of the towers (basic measured fastest for the user tower "
        "here: docs/benchmarks.md, loadtest.ort_options).",
    )
    faiss_device: Literal["auto", "cpu", "gpu"] = "auto"
    mmap_items: bool = Field(
        True,
        description="Memory-map the bundle's item arrays (tokens, vectors) read-only instead of reading them into "
        "memory: only the rows requests touch are resident, and they are shared with the page cache.",
    )
    rescore_dtype: Literal["auto", "float16", "float32"] = Field(
        "auto",
        description="Precision the exact re-scoring reads first: float16 scores the candidates from the bundle's "
        "float16 copies (`missrec build-index` writes them) and re-checks in float32 only those that can reach the "
        "k-th place (the same top-k, half the vector pages resident); float32 reads the float32 vectors only; auto: "
        "float16 when the bundle has the copies. float16 with a bundle without them is refused at start-up.",
    )
    index_params: dict[str, float] = Field(
        default_factory=dict,
        description='FAISS search parameters over the bundle\'s recorded ones, e.g. {"nprobe": 128} (JSON).',
    )
    max_candidates: int | None = Field(
        1024,
        ge=16,
        description="ANN indexes only: most candidates re-scored exactly per user (bounds the tail; unset = widen "
        "until the stop rule holds). Exact indexes always widen until the top-k is proven.",
    )
    max_batch_size: int = Field(64, ge=1, le=4096, description="Micro-batch size cap for the user tower + search.")
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="How long a batch may linger for batch-mates (0: batches are what queued)."
    )
    linger: Literal["adaptive", "fixed"] = Field(
        "adaptive",
        description="adaptive: a batch lingers (up to max_wait_ms) only when the rate of requests arriving while "
        "others are in flight expects a batch-mate within the wait, so a lone client never waits for company; "
        "fixed: every batch lingers.",
    )
    max_queue_ms: float | None = Field(
        500.0,
        gt=0,
        le=60_000,
        description="Longest queue wait of a recommendation before its batch starts: above capacity, requests that "
        "would wait longer get 503 (Retry-After) at once instead of late answers (unset = no bound).",
    )
    warmup: bool = Field(True, description="Run max-shape batches before /readyz turns ready.")
    gc_freeze: bool = Field(
        False,
        description="At the end of start-up move every object alive to the garbage collector's permanent "
        "generation (gc.freeze), so full collections stop walking the start-up heap (missrec_gc_seconds shows "
        "the pauses). Off by default: no gain measured here, and start-up objects that later become cyclic "
        "garbage (an old bundle's, after a swap) are never collected while frozen.",
    )
    access_log: bool = Field(
        False,
        description="uvicorn's access log line per request (off by default: formatting it costs ~5% of a core "
        "under load; /metrics counts every request by route and status).",
    )

    # --- cold-start ingestion ------------------------------------------------------------------------------
    clip_model: str = Field("ViT-B-32", description="open_clip architecture name.")
    clip_pretrained: str | None = Field(
        "openai", description="open_clip pretrained tag or a local checkpoint path; unset = ingestion disabled."
    )
    clip_onnx: Path | None = Field(
        None,
        description="CLIP ONNX directory (`missrec export-clip`): ingest through ONNX Runtime, no torch or open_clip "
        "in the process; an explicit clip_model or clip_pretrained must name the same model and weights.",
    )
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest accepted image upload.")
    max_text_chars: int = Field(
        MAX_TEXT_CHARS, ge=1, le=MAX_TEXT_CHARS, description="Longest accepted item text (413 above)."
    )
    ingest_concurrency: int = Field(
        1, ge=1, le=64, description="Images encoded at once (each is CPU-heavy; recommendations share the cores)."
    )
    ingest_queue: int = Field(8, ge=0, le=10_000, description="Ingests waiting for an encoder before new ones get 503.")
    ingest_threads: int = Field(
        1, ge=1, le=256, description="Threads of an encode (1 leaves the other cores to recommendations)."
    )

    search_concurrency: int = Field(
        1, ge=1, le=64, description="Item searches (GET /v1/items?q=, a Python scan) run at once (1: the rest queue)."
    )
    search_queue: int = Field(4, ge=0, le=10_000, description="Searches waiting for a slot before new ones get 503.")

    # --- request limits and security ----------------------------------------------------------------------
    api_key: SecretStr | None = Field(None, description="If set, required (X-API-Key) on write and admin endpoints.")
    max_k: int = Field(MAX_K, ge=1, le=MAX_K, description="Largest k accepted in a request (422 above).")
    max_history: int = Field(
        MAX_HISTORY,
        ge=1,
        le=MAX_HISTORY,
        description="Longest explicit history accepted in a request (422 above); the model reads its last max_len.",
    )
    max_batch_requests: int = Field(
        MAX_BATCH_REQUESTS, ge=1, le=MAX_BATCH_REQUESTS, description="Most recommendations in one batch call."
    )
    max_batch_total_k: int = Field(
        20_000, ge=1, description="Most items one batch call may ask for (the sum of its k; bounds its work)."
    )
    max_events: int = Field(MAX_EVENTS, ge=1, le=MAX_EVENTS, description="Most item ids in one events call.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    max_concurrency: int = Field(
        64,  # ~ one core's capacity x an acceptable latency (1,000 req/s x 64 ms): docs/reliability.md, overload
        ge=1,
        description="Requests being processed (body read) before new ones get 503 (and /readyz 503).",
    )
    body_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="Time a request body may take to arrive (408 and the connection closed after)."
    )
    max_pending_bodies: int = Field(
        1024, ge=1, description="Request bodies arriving at once before new requests get 503 (a slow body holds one)."
    )

    def check_limits(self) -> None:
        """Refuse limits above what the published schema allows, and a blank API key (settings built with overrides skip
        validation)."""
        caps = {
            "max_k": MAX_K,
            "max_history": MAX_HISTORY,
            "max_batch_requests": MAX_BATCH_REQUESTS,
            "max_events": MAX_EVENTS,
            "max_text_chars": MAX_TEXT_CHARS,
        }
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            raise ValueError(f"MISSREC_API_KEY: {BLANK_KEY}")
        for name, cap in caps.items():
            value = getattr(self, name)
            if not 1 <= value <= cap:
                raise ValueError(f"MISSREC_{name.upper()}={value} is outside 1..{cap}, the limit the API publishes")

    def swap_root(self) -> Path | None:
        """The resolved directory swaps are confined to (None without a bundle): MISSREC_BUNDLE_ROOT, else the
        directory holding MISSREC_BUNDLE, but never the filesystem root (a container's ``MISSREC_BUNDLE=/bundle``
        would let a swap name any directory of the machine): then the bundle directory itself."""
        if self.bundle_root is not None:
            return self.bundle_root.resolve()
        if self.bundle is None:
            return None
        bundle = self.bundle.resolve()
        return bundle if bundle.parent == bundle.parent.parent else bundle.parent

    @field_validator("api_key")
    @classmethod
    def _no_blank_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(BLANK_KEY)
        return value

    @field_validator("bundle", "data_dir", "bundle_root", "clip_onnx", mode="before")
    @classmethod
    def _expand(cls, value: object) -> object:
        return Path(value).expanduser() if isinstance(value, str) and value else value


@lru_cache
def get_settings() -> Settings:
    return Settings()
