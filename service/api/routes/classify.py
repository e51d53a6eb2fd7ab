"""``POST /v1/classify``: one or several images in, top-k labels out.

The handler reads the images (raw body or multipart), hands them to the Classifier seam and
encodes the answer with :mod:`service.protocols.v1`. The pydantic models below exist for the
OpenAPI schema only.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.api.deps import model_query, repository_of, request_context, settings_of
from service.api.errors import ProtocolRoute, error_example
from service.engine.decode import is_supported_image_type
from service.errors import NOT_READY_DETAIL, InvalidParameter, InvalidRequest, PayloadTooLarge
from service.protocols.v1 import (
    SUPPORTED_HINT,
    Images,
    classify_response,
    media_type,
    parse_top_k,
    unsupported,
)
from service.settings import Settings

router = APIRouter(tags=["classify"], route_class=ProtocolRoute)


class Prediction(BaseModel):
    label: str = Field(examples=["Ankle boot"])
    index: int = Field(examples=[9])
    probability: float = Field(examples=[0.93])


class ImageResult(BaseModel):
    filename: str | None = Field(description="Multipart file name; null for a raw body.")
    predictions: list[Prediction]


class ModelRef(BaseModel):
    name: str
    version: str


class ClassifyResponse(BaseModel):
    model: ModelRef
    results: list[ImageResult] = Field(description="One entry per image, in request order.")


EXAMPLE = {
    "model": {"name": "mobilenet_v1-fashion-mnist", "version": "1"},
    "results": [
        {
            "filename": "boot.png",
            "predictions": [
                {"label": "Ankle boot", "index": 9, "probability": 0.93},
                {"label": "Sneaker", "index": 7, "probability": 0.05},
            ],
        }
    ],
}

REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "One or several images (repeat the field).",
                    }
                },
                "required": ["file"],
            }
        },
        "image/*": {
            "schema": {"type": "string", "format": "binary"},
            "example": "<PNG/JPEG/WebP/TIFF/BMP/GIF bytes>",
        },
    },
}

RESPONSES = {
    200: {"content": {"application/json": {"example": EXAMPLE}}},
    **error_example(
        400, "invalid_image", "cannot decode image: image file is truncated", "Bad image."
    ),
    **error_example(
        413,
        "body_too_large",
        "the request body exceeds the limit of 10485760 bytes",
        "Body over SEPCONV_MAX_BODY_BYTES, or image over SEPCONV_MAX_PIXELS "
        "(error `image_too_large`).",
    ),
    **error_example(
        415,
        "unsupported_media_type",
        "content type text/plain is not supported; " + SUPPORTED_HINT,
        "Neither multipart nor a supported image type.",
    ),
    **error_example(
        422,
        "invalid_parameter",
        "query.top_k: must be an integer >= 1, got '0'",
        "Bad parameter, or no `file` field.",
    ),
    429: {
        "description": "Batch queue full; retry after the `Retry-After` seconds.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {
            "application/json": {
                "example": {
                    "error": "overloaded",
                    "detail": "the batch queue is full (512 images waiting); retry later",
                }
            }
        },
    },
    **error_example(
        404, "not_found", "unknown model 'resnet'; this server serves 'fashion'", "No such model."
    ),
    **error_example(503, "not_ready", NOT_READY_DETAIL, "Model not loaded yet."),
    **error_example(
        504,
        "timeout",
        "no result within 10 s; the server is overloaded",
        "The image waited longer than SEPCONV_REQUEST_TIMEOUT_S.",
    ),
}


TOP_K_PARAMETER = {
    "name": "top_k",
    "in": "query",
    "required": False,
    "description": "Labels per image; at least 1, clamped to the number of classes.",
    "schema": {"type": "integer", "minimum": 1, "default": 5},
    "example": 3,
}
MODEL_PARAMETERS = [
    {
        "name": "model",
        "in": "query",
        "required": False,
        "description": "Model name (GET /v2/repository/index lists them); default: the "
        "server's default model (SEPCONV_DEFAULT_MODEL).",
        "schema": {"type": "string"},
    },
    {
        "name": "version",
        "in": "query",
        "required": False,
        "description": "Model version; default: the highest loaded.",
        "schema": {"type": "string"},
    },
]


async def _read_multipart(request: Request, settings: Settings) -> tuple[list[bytes], list[str]]:
    blobs: list[bytes] = []
    names: list[str] = []
    limit = settings.max_images_per_request
    try:
        form = await request.form(max_files=limit, max_fields=16)
    except StarletteHTTPException as exc:
        # Starlette reports every multipart problem as a 400 with a message; the file cap is
        # the one that deserves its own status and code.
        if "Too many files" in str(exc.detail):
            raise PayloadTooLarge(
                f"at most {limit} images per request", code="too_many_images"
            ) from exc
        raise InvalidRequest(
            f"malformed multipart body: {exc.detail}", code="invalid_multipart"
        ) from exc
    try:
        parts = form.getlist("file")
        if not parts:
            raise InvalidParameter("the multipart body has no `file` field", code="missing_file")
        for part in parts:
            if not isinstance(part, UploadFile):
                raise InvalidParameter("`file` must be a file upload")
            media = media_type(part.content_type)
            if media not in ("", "application/octet-stream") and not is_supported_image_type(media):
                raise unsupported(media)
            blobs.append(await part.read())
            names.append(part.filename or "")
    finally:
        await form.close()  # removes spooled temporary files at once
    return blobs, names


@router.post(
    "/v1/classify",
    summary="Classify images",
    description=(
        "Send one or several images as `multipart/form-data` (field `file`, repeatable), or one "
        "image as the raw body with its `image/*` Content-Type (the fastest path). Each image "
        "is decoded, colour-converted, resized and normalised exactly as in training (from the "
        "model's metadata), batched with concurrent requests, and answered with its `top_k` "
        "most probable labels. EXIF orientation, alpha, palette, 16-bit and CMYK are handled."
    ),
    response_model=ClassifyResponse,
    responses=RESPONSES,
    openapi_extra={
        "requestBody": REQUEST_BODY,
        "parameters": [TOP_K_PARAMETER, *MODEL_PARAMETERS],
    },
)
async def classify(request: Request) -> Response:
    # No Depends() and no declared query model here: FastAPI's dependency solving costs about a
    # sixth of this route's Python time, and this is the route that sees the traffic.
    top_k = parse_top_k(
        request.query_params.get("top_k") if request.scope["query_string"] else None
    )
    name, version = model_query(request)

    async def read(_spec) -> Images:
        # Called by the seam once the request is admitted: a refusal reads no body.
        media = media_type(request.headers.get("content-type"))
        if media == "multipart/form-data":
            return Images(*await _read_multipart(request, settings_of(request)))
        if media.startswith("image/") and is_supported_image_type(media):
            return Images([await request.body()], [])
        raise unsupported(media)

    answer = await repository_of(request).infer(read, request_context("v1"), name, version)
    return Response(
        classify_response(answer.spec, answer.probs, answer.inputs.names, top_k),
        media_type="application/json",
    )
