"""Service settings, read from LIMOE_* environment variables (pydantic-settings).

Invalid values fail at start-up with a message naming the variable. Nothing here is read at
import time: `create_app(Settings())` decides when the environment is consulted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from limoe.runtime.model_store import default_store


def default_jobs_dir() -> Path:
    """Batch jobs' database and files: under the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "limoe" / "jobs"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIMOE_", extra="ignore", frozen=True)

    # --- the model ------------------------------------------------------------------------------
    model: str = Field("limoe-small", description="model name in the store, or a path to an entry directory")
    model_version: str = Field("latest", description="store version, or 'latest'")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated models to serve at once: store names, name@version, or "
        "entry directories; the first is the default (requests that name no model). Empty: LIMOE_MODEL alone")
    store_poll_s: float = Field(0.0, ge=0, description="seconds between looks at the store for a newer version of "
                                "each served name, loaded when found (0 = off; the repository API loads on demand)")
    model_store: Path = Field(default_factory=default_store, description="model store root")
    backend: Literal["onnx", "torchscript"] = "onnx"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    quantized: bool | None = Field(None, description="true: the entry's int8 ONNX graphs (CPU), false: its fp32 "
                                                      "ones; unset: fp32 when the entry has them, else int8")
    threads: int = Field(0, ge=0, description="intra-op threads per forward pass; 0 = the cores shared out among "
                                              "LIMOE_ENCODER_PASSES (one pass: the library's default)")
    spinning: bool = Field(True, description="ONNX Runtime threads busy-wait between ops (faster alone, "
                                               "but they steal CPU from decoding and HTTP on small machines)")

    # --- batching -------------------------------------------------------------------------------
    encoder_passes: int = Field(2, ge=1, le=16, description="forward passes each encoder runs at once, each in its "
                                "own thread (like Triton's model instances): a batch starts while another runs")
    pass_share: bool = Field(True, description="several models' encoders share the forward passes: while others "
                             "have work, each runs its share of LIMOE_ENCODER_PASSES at once (false: each runs all)")
    pass_nice: int = Field(10, ge=0, le=19, description="CPU niceness of the forward-pass threads (Linux): "
                           "the event loop and image decoding, which every request needs, get a core before "
                           "the long passes do (0 = the process's priority)")
    shared_inflight: int = Field(8, ge=0, description="while several models have requests, each has at most "
                                 "this many in flight; its others wait their turn before decoding (0 = no limit)")
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_batch_wait_ms: float = Field(5.0, ge=0, le=10_000)
    queue_size: int = Field(256, ge=1, description="items waiting per encoder before 429")
    request_timeout_s: float = Field(30.0, gt=0, description="a request still unanswered then gets 504")
    infer_timeout_s: float = Field(60.0, ge=0, description="a forward pass that has not returned by then is stuck: "
                                   "its items get 504, the server reports not ready while it stays stuck, and "
                                   "/healthz fails once more passes are stuck than LIMOE_ENCODER_PASSES (0 = off)")
    preprocess_workers: int = Field(2, ge=1, le=64, description="threads decoding and resizing images")
    warmup: bool = Field(True, description="run every batch size once before reporting ready")

    # --- limits ---------------------------------------------------------------------------------
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_inflight_bytes: int = Field(64 * 1024 * 1024, ge=1024,
                                    description="request-body bytes all requests in flight may hold; 429 beyond")
    header_timeout_s: float = Field(20.0, gt=0, description="seconds a connection may take to send a request's "
                                                           "headers; closed beyond (408 if it had begun)")
    body_timeout_s: float = Field(60.0, gt=0, description="seconds a client may take to send a request body; "
                                                         "408 beyond")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=64)
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height, checked before decoding")
    max_decode_pixels: int = Field(40_000_000, ge=1, description="width x height of all the images being decoded "
                                   "at once (all models): a decode waits for room, so decoding holds at most about "
                                   "8 bytes a pixel of this (320 MB by default) however many images arrive")
    mmap_threshold_bytes: int = Field(4 * 2 ** 20, ge=0, description="allocations this large or larger (bodies, "
                                      "decoded images) are given back to the OS when freed, so memory falls back "
                                      "after a burst (glibc's M_MMAP_THRESHOLD); 0 = glibc's own, adaptive")
    max_labels: int = Field(1000, ge=1, description="candidate labels per request (ImageNet has 1000 classes)")
    max_label_chars: int = Field(200, ge=1)
    max_images_per_request: int = Field(16, ge=1)
    max_bulk_images: int = Field(256, ge=1)
    label_cache_size: int = Field(4096, ge=0, description="label embeddings kept (LRU)")
    label_set_cache_mb: float = Field(64.0, ge=0, description="MiB of whole label sets' class matrices kept (LRU), "
                                                             "so a label set seen before costs no per-label work")

    # --- batch jobs (docs/BATCH.md) -------------------------------------------------------------
    jobs_enabled: bool = Field(True, description="serve /v1/files and /v1/batches and run batch jobs")
    jobs_dir: Path = Field(default_factory=default_jobs_dir, description="writable directory for the jobs' SQLite "
                                                                        "database and files; one server at a time")
    jobs_max_lines: int = Field(50_000, ge=1, description="requests per batch input file")
    jobs_max_file_bytes: int = Field(200 * 2 ** 20, ge=1024, description="bytes per uploaded file (streamed to disk)")
    jobs_max_active: int = Field(4, ge=1, description="batches not yet finished, per server; 429 beyond")
    jobs_concurrency: int = Field(64, ge=1, le=1024, description="requests of one batch in flight at once (enough to "
                                                                 "fill forward passes when the server is quiet)")
    jobs_max_batch: int = Field(2, ge=1, description="batch-job examples per forward pass while interactive traffic "
                                                    "flows (full passes after 1 s without it): smaller keeps "
                                                    "interactive latency lower")
    jobs_ttl_s: float = Field(7 * 86400, gt=0, description="files, and batches once finished, are deleted after this")

    # --- security -------------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated Bearer keys; empty = no authentication")
    protect_health: bool = Field(False, description="require a key for health endpoints too")
    protect_metrics: bool = Field(False, description="require a key for /metrics too")
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated Bearer keys for the model repository API "
        "(/v2/repository: load, unload, index), apart from LIMOE_API_KEYS; empty = that API is off")

    # --- server ---------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    keep_alive_s: float = Field(65.0, gt=0, description="idle keep-alive; above load balancers' 60 s idle timeout")
    drain_s: float = Field(30.0, gt=0, description="graceful shutdown budget, from the first SIGTERM to exit: "
                                                  "requests still in flight then get 503 (docs/SHUTDOWN.md)")
    drain_grace_s: float = Field(5.0, ge=0, description="after SIGTERM, readiness answers 503 but new requests are "
                                                        "still served this long (load balancers take a moment)")

    @field_validator("api_keys", "admin_keys", "models", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.max_image_bytes > self.max_body_bytes:
            raise ValueError("LIMOE_MAX_IMAGE_BYTES cannot exceed LIMOE_MAX_BODY_BYTES")
        if self.max_body_bytes > self.max_inflight_bytes:
            raise ValueError("LIMOE_MAX_BODY_BYTES cannot exceed LIMOE_MAX_INFLIGHT_BYTES (such a body could never "
                             "be served)")
        if self.drain_grace_s >= self.drain_s:
            raise ValueError("LIMOE_DRAIN_GRACE_S must be shorter than LIMOE_DRAIN_S (the grace is part of the drain)")
        if self.admin_keys and self.api_keys and {k.get_secret_value() for k in self.admin_keys} & {
                k.get_secret_value() for k in self.api_keys}:
            raise ValueError("LIMOE_ADMIN_KEYS and LIMOE_API_KEYS must not share a key (an API key must not "
                             "load or unload models)")
        if self.quantized and self.backend != "onnx":
            raise ValueError("quantized graphs exist only for the onnx backend")
        return self

    @property
    def model_is_path(self) -> bool:
        return is_path(self.model)

    @property
    def model_refs(self) -> list[str]:
        """The models to serve, the default first: LIMOE_MODELS, or LIMOE_MODEL (@ LIMOE_MODEL_VERSION)."""
        if self.models:
            return list(self.models)
        if self.model_is_path or self.model_version == "latest":
            return [self.model]
        return [f"{self.model}@{self.model_version}"]


def is_path(ref: str) -> bool:
    """A model reference that names an entry directory rather than a store name."""
    return os.sep in ref or ref.startswith(".")
