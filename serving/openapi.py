"""OpenAPI fragments for routes that read their body by hand (binary v2, multipart images).

The handlers parse raw bytes (the v2 binary extension cannot be a pydantic model), so the
request schemas are declared here for /docs and for schema fuzzing (schemathesis).
"""

from __future__ import annotations

ERROR_BODY = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}

ERROR_RESPONSES = {
    code: {"description": text, "content": {"application/json": {"schema": ERROR_BODY}}}
    for code, text in {
        400: "Malformed request (shape, datatype, JSON, unknown sub-unit, undecodable image).",
        401: "Missing or wrong bearer token (when the server has one).",
        404: "Unknown model, version or layer.",
        413: "Body, tensor or image too large.",
        415: "Unsupported Content-Type or Content-Encoding.",
        503: "Queue full, request timed out in the queue, or not ready; retry later.",
    }.items()
}

TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "description": "`input`, or a `steer.<layer>` input."},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "example": "FP32"},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
        "data": {"type": "array", "items": {}, "description": "Row-major values (flat or nested)."},
    },
}

INFER_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_output": {"type": "boolean"},
                "steer": {"type": "object", "additionalProperties": {"type": "number"},
                          "description": 'Scale named sub-units, e.g. {"blocks.3.mlp/0042.1": 0.0}.'},
            },
        },
        "inputs": {"type": "array", "items": TENSOR, "minItems": 1},
        "outputs": {
            "type": "array",
            "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"},
                "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
            }},
        },
    },
}

INFER_REQUEST = {
    "required": True,
    "description": "KServe v2 inference request. With the binary tensor extension the JSON header is "
                   "followed by raw tensor bytes and its length is sent in `Inference-Header-Content-Length`.",
    "content": {
        "application/json": {"schema": INFER_SCHEMA},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}

IMAGE_REQUEST = {
    "required": True,
    "description": "One or more PNG/JPEG images: multipart field(s) `file` (plus optional fields `steer`, "
                   "`top_k`, `top_subunits`), or a single image as the raw body.",
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary"},
                "steer": {"type": "string", "description": 'JSON object {"sub-unit name": scale}.'},
                "top_k": {"type": "integer", "minimum": 0, "maximum": 1000},
                "top_subunits": {"type": "integer", "minimum": 0, "maximum": 1000},
            },
        }},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
}


def infer_paths() -> dict:
    """OpenAPI path items of the v2 infer routes (served as plain Starlette routes)."""
    def operation(with_version: bool) -> dict:
        parameters = [{"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}]
        if with_version:
            parameters.append({"name": "version", "in": "path", "required": True, "schema": {"type": "string"}})
        return {"post": {
            "tags": ["KServe v2"], "summary": "Infer",
            "operationId": "infer_version" if with_version else "infer",
            "parameters": parameters,
            "requestBody": INFER_REQUEST,
            "responses": {"200": {"description": "v2 inference response (JSON, or JSON + binary tensors with "
                                                 "`Inference-Header-Content-Length`)"},
                          **{str(code): ERROR_RESPONSES[code] for code in (400, 401, 404, 413, 415, 503)}},
        }}

    return {"/v2/models/{model_name}/infer": operation(False),
            "/v2/models/{model_name}/versions/{version}/infer": operation(True)}
