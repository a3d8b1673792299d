"""The request and response bodies of the three APIs, as pydantic models. FastAPI validates
requests against them and generates the OpenAPI schema (with these examples) from them.

What the models cannot know, because it depends on the settings (how many labels, images,
characters), is checked by the API adapters right after validation, with the same error shape.
Validators that refuse a value with one of our error codes raise `refuse(code, message)`; any
other validation error becomes 422 invalid_request (service.errors.invalid_request).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence

import numpy as np
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    WithJsonSchema,
    model_validator,
)

from service.errors import refuse

PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


def examples(*values: Any) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(values)})


class ErrorBody(BaseModel):
    """Every error: a message for people and a code for programs. Internal details never appear."""

    model_config = examples({"error": "the image is 12000000 bytes; the limit is 10485760", "code": "image_too_large"})
    error: str
    code: str


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting our error body for these statuses."""
    return {status: {"model": ErrorBody, "description": "error"} for status in statuses}


# -- native: /v1/classify, /v1/classify/bulk ----------------------------------------------------------

Base64Images = Annotated[list[str], Field(description="base64-encoded image files (PNG, JPEG, GIF, WebP, BMP, "
                                                      "TIFF); data: URLs too")]
Labels = Annotated[list[str], Field(description="candidate labels")]
Templates = Annotated[list[str] | None, Field(description="prompt templates with one '{}' each; default: the "
                                                          "model's")]
TopK = Annotated[int | None, Field(ge=1, description="return only the best k labels")]
Explain = Annotated[bool, Field(description="include how each image was routed through the experts")]
ModelName = Annotated[str | None, Field(description="the model to use: a name this server serves (GET /v1/models), "
                                                    "or name@version to pin a version; default: the server's "
                                                    "default model", min_length=1, max_length=200)]


class ClassifyRequest(BaseModel):
    """JSON body of /v1/classify and /v1/classify/bulk."""

    model_config = examples({"images": [PNG_1PX], "labels": ["cat", "dog", "red circle"], "top_k": 2})
    images: Base64Images
    labels: Labels
    templates: Templates = None
    top_k: TopK = None
    explain: Explain = False
    model: ModelName = None


class ClassifyForm(BaseModel):
    """multipart/form-data body of /v1/classify and /v1/classify/bulk: repeat `images` per file
    and `labels` per label."""

    images: list[bytes] = Field(description="image files; repeat the field for several images")
    labels: list[str] = Field(description="candidate labels; repeat the field per label")
    templates: Templates = None
    top_k: TopK = None
    explain: Explain = False
    model: ModelName = None


def form_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` adding a multipart/form-data alternative (`model`'s schema) to a route's
    generated JSON request body."""
    return {"requestBody": {"content": {"multipart/form-data": {"schema": model.model_json_schema()}}}}


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="softmax over the request's labels")


def ranked(scores: np.ndarray, labels: Sequence[str], top_k: int | None = None) -> list[dict[str, Any]]:
    """LabelScores for one image's (C,) scores: best first (ties in label order), the best `top_k`
    only when given."""
    order = np.argsort(-scores, kind="stable")[: top_k or len(labels)]
    return [{"label": labels[j], "score": float(scores[j])} for j in order]


class LayerRouting(BaseModel):
    layer: int = Field(description="block index of this MoE layer")
    tokens_per_expert: list[int] = Field(description="token choices each expert took")
    dropped: int = Field(description="token choices dropped because their expert was full")
    top1_expert: list[int] = Field(description="each token's first-choice expert; -1 where it was dropped (and, for "
                                               "text, on padding)")


class RoutingSummary(BaseModel):
    modality: Literal["image", "text"]
    num_experts: int
    layers: list[LayerRouting]
    grid: int | None = Field(None, description="images: top1_expert is a grid x grid patch map, row-major")
    note: str | None = Field(None, description="why `layers` is empty: the model has no expert layers")


class ClassifyResult(BaseModel):
    """One image's ranked labels, or its own error."""

    index: int
    labels: list[LabelScore] | None = Field(None, description="sorted by score, best first")
    routing: RoutingSummary | None = Field(None, description="with explain")
    error: str | None = None
    code: str | None = None


class PromptRouting(BaseModel):
    prompt: str = Field(description="the label in one template")
    routing: RoutingSummary


class LabelRouting(BaseModel):
    label: str
    prompts: list[PromptRouting] = Field(description="one per template, in template order")


class ClassifyResponse(BaseModel):
    """200 when at least one image was classified; when none was, the first image's error status,
    with its error here too."""

    model_config = examples({"model": "limoe-small", "version": "1", "results": [
        {"index": 0, "labels": [{"label": "cat", "score": 0.91}, {"label": "dog", "score": 0.09}]},
        {"index": 1, "error": "cannot decode image: cannot identify image file", "code": "invalid_image"}]})
    model: str
    version: str
    results: list[ClassifyResult]
    label_routing: list[LabelRouting] | None = Field(None, description="with explain: how each label's prompts were "
                                                                       "routed, in label order")
    error: str | None = None
    code: str | None = None


# -- native: /v1/embed, /v1/models ----------------------------------------------------------------------

class EmbedRequest(BaseModel):
    model_config = examples({"images": [PNG_1PX], "texts": ["a photo of a cat"]})
    images: Base64Images = []
    texts: list[str] = Field([], description="texts, embedded as given (no templates)")
    explain: Explain = False
    model: ModelName = None


class Embedding(BaseModel):
    index: int
    embedding: list[float] | None = Field(None, description="L2-normalised")
    routing: RoutingSummary | None = None
    error: str | None = None
    code: str | None = None


class EmbedResponse(BaseModel):
    model_config = examples({"model": "limoe-small", "version": "1", "images": [{"index": 0, "embedding": [0.6, -0.8]}],
                             "texts": [{"index": 0, "embedding": [0.8, 0.6]}]})
    model: str
    version: str
    images: list[Embedding]
    texts: list[Embedding]


class ModelInfo(BaseModel):
    name: str
    version: str
    backend: str
    device: str
    ready: bool
    default: bool = Field(description="requests that name no model get this one (the first of LIMOE_MODELS)")
    current: bool = Field(description="the version that `name` alone means (the newest loaded)")
    state: str = Field(description="READY, LOADING (warming up) or UNLOADING (finishing its requests)")
    memory_bytes: int = Field(description="memory the server allocated (and still holds) while this version was opened")
    loaded_at: float = Field(description="Unix time it was loaded")
    manifest: dict[str, Any] = Field(description="the store entry's manifest.json")


class ModelsResponse(BaseModel):
    default: str = Field(description="the default model's name")
    models: list[ModelInfo]


# -- Hugging Face: POST /, POST /models/{name} -----------------------------------------------------------

def _hf_labels(value: Any) -> Any:
    if isinstance(value, str):  # older huggingface_hub versions: one comma-separated string
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        return value
    raise refuse("invalid_labels", "candidate_labels must be a list of strings or a comma-separated string")


def _hf_template(value: Any) -> Any:
    if not isinstance(value, str) or value.count("{}") != 1:
        raise refuse("invalid_templates", "hypothesis_template must contain exactly one '{}'")
    return value


HFLabels = Annotated[list[Any], BeforeValidator(_hf_labels), WithJsonSchema({
    "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string", "description": "comma-separated"}]})]
HFTemplate = Annotated[str, BeforeValidator(_hf_template)]
_LABEL_NAMES = AliasChoices("candidate_labels", "candidateLabels")


class HFParameters(BaseModel):
    candidate_labels: HFLabels | None = Field(None, validation_alias=_LABEL_NAMES)
    hypothesis_template: HFTemplate | None = Field(None, examples=["a photo of a {}."])


class HFImageInputs(BaseModel):
    """The older shape: {"inputs": {"image": <base64>, "candidateLabels": "a,b"}}."""

    image: str
    candidate_labels: HFLabels | None = Field(None, validation_alias=AliasChoices("candidateLabels",
                                                                                  "candidate_labels"))


class HFRequest(BaseModel):
    """zero-shot-image-classification: {"inputs": <base64 image>, "parameters": {"candidate_labels": [...]}}."""

    model_config = examples({"inputs": PNG_1PX, "parameters": {"candidate_labels": ["cat", "dog"],
                                                                "hypothesis_template": "a photo of a {}."}})
    inputs: Annotated[Annotated[str, Tag("base64")] | Annotated[HFImageInputs, Tag("object")],
                      Discriminator(lambda v: "object" if isinstance(v, (dict, HFImageInputs)) else "base64"),
                      Field(description="base64-encoded image file")]
    parameters: HFParameters | None = None

    @model_validator(mode="after")
    def _has_labels(self) -> HFRequest:
        if self.labels is None:
            raise refuse("invalid_labels", "parameters.candidate_labels is required")
        return self

    @property
    def image(self) -> str:
        return self.inputs.image if isinstance(self.inputs, HFImageInputs) else self.inputs

    @property
    def labels(self) -> list[Any] | None:
        given = self.parameters.candidate_labels if self.parameters else None
        if isinstance(self.inputs, HFImageInputs) and self.inputs.candidate_labels is not None:
            return self.inputs.candidate_labels
        return given

    @property
    def template(self) -> str | None:
        return self.parameters.hypothesis_template if self.parameters else None


# -- Open Inference Protocol v2 ------------------------------------------------------------------------

def _flag(value: Any) -> bool:
    """JSON true, or the string "true" (some clients stringify parameters); anything else is false."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


Flag = Annotated[bool, BeforeValidator(_flag)]
NullAsEmpty = BeforeValidator(lambda v: {} if v is None else v)  # tensors' "parameters": null is no parameters


class TensorParameters(BaseModel):
    binary_data_size: int | None = Field(None, description="bytes of this tensor in the binary section")


class InputTensor(BaseModel):
    name: Literal["IMAGE", "LABELS"]
    datatype: Literal["BYTES"]
    shape: list[Annotated[StrictInt, Field(ge=0)]] = Field(min_length=1, max_length=1)
    data: list[str] | None = Field(None, description="IMAGE: base64 image files; LABELS: the labels")
    parameters: Annotated[TensorParameters, NullAsEmpty] = TensorParameters()

    @model_validator(mode="after")
    def _data_fits(self) -> InputTensor:
        if self.parameters.binary_data_size is None and (self.data is None or len(self.data) != self.shape[0]):
            raise ValueError(f"'data' must be a list of {self.shape[0]} elements")
        return self


class OutputParameters(BaseModel):
    binary_data: Flag | None = None


class RequestedOutput(BaseModel):
    name: Literal["SCORES", "EXPERTS"]
    parameters: Annotated[OutputParameters, NullAsEmpty] = OutputParameters()


class InferParameters(BaseModel):
    binary_data_output: Flag = False


class InferRequest(BaseModel):
    """Inputs IMAGE (BYTES [N]) and LABELS (BYTES [C]); outputs SCORES and EXPERTS unless `outputs`
    names some."""

    model_config = examples({
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [PNG_1PX]},
                   {"name": "LABELS", "datatype": "BYTES", "shape": [2], "data": ["cat", "dog"]}],
        "outputs": [{"name": "SCORES"}]})
    id: str | int | None = None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] = []
    parameters: InferParameters = InferParameters()

    @model_validator(mode="after")
    def _image_and_labels(self) -> InferRequest:
        names = [t.name for t in self.inputs]
        for name in ("IMAGE", "LABELS"):
            if names.count(name) > 1:
                raise ValueError(f"input {name} is given twice")
        if set(names) != {"IMAGE", "LABELS"}:
            raise ValueError("inputs IMAGE and LABELS are both required")
        return self

    def input(self, name: str) -> InputTensor:
        return next(t for t in self.inputs if t.name == name)

    def wanted(self) -> dict[str, bool]:
        """Output name -> binary? (every output, binary or not per the request, when none is named)."""
        default = self.parameters.binary_data_output
        if not self.outputs:
            return {"SCORES": default, "EXPERTS": default}
        return {o.name: default if o.parameters.binary_data is None else o.parameters.binary_data
                for o in self.outputs}


class OutputTensor(BaseModel):
    name: str
    datatype: Literal["FP32", "INT64"]
    shape: list[int]
    data: list[float] | list[int] | None = Field(None, description="row-major; absent when sent as binary data")
    parameters: TensorParameters | None = None


class InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), **examples({
        "model_name": "limoe-small", "model_version": "1",
        "outputs": [{"name": "SCORES", "datatype": "FP32", "shape": [1, 2], "data": [0.93, 0.07]}]}))
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | int | None = None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]



# -- batch jobs: /v1/files, /v1/batches (the OpenAI Batch API's shapes) -----------------------------------

Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]


class BatchCreate(BaseModel):
    """POST /v1/batches: a batch of the requests in an uploaded input file."""

    model_config = examples({"input_file_id": "file-4f1c0e2a9b8d7c6e5f4a3b2c", "endpoint": "/v1/classify",
                             "completion_window": "24h", "metadata": {"project": "catalogue"}})
    input_file_id: str = Field(description="a file uploaded with purpose=batch: one JSON request per line")
    endpoint: Literal["/v1/classify"] = Field(description="the route every request of the file names")
    completion_window: Literal["24h"] = Field(description="a batch not finished by then expires")
    metadata: Metadata | None = Field(None, max_length=16, description="up to 16 key-value pairs, kept as given")


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["processed"]
    expires_at: int = Field(description="deleted then (LIMOE_JOBS_TTL_S after upload)")


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchError(BaseModel):
    code: str
    message: str
    line: int | None = Field(None, description="1-based line of the input file")
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int = Field(description="requests answered 2xx: lines of the output file")
    failed: int = Field(description="the others: lines of the error file")


class BatchObject(BaseModel):
    """A batch. Timestamps are Unix seconds, null until reached."""

    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None = Field(description="why validation failed")
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    model_versions: dict[str, str] | None = Field(None, description="the model versions the batch answers with: "
                                                  "each model its requests name, pinned when first used")


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
