"""The OpenAPI 3.1 schema of the service, written out: the prediction endpoint takes a multipart form or JSON, which
a framework's signature-derived schema cannot say, and the docs page (static/docs.html) renders it offline."""

from __future__ import annotations

from typing import Any

from fcclass.serve.model import Limits
from fcclass.version import __version__


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _schemas() -> dict[str, Any]:
    top = {"type": "object", "properties": {"label": {"type": "string"}, "probability": {"type": "number"}}}
    return {
        "Prediction": {"type": "object", "required": ["path", "label", "probability", "top_k"], "properties": {
            "path": {"type": "string", "description": "The uploaded file's name (JSON: its name, or images[i])."},
            "label": {"type": "string"}, "probability": {"type": "number"},
            "top_k": {"type": "array", "items": top}}},
        "Predictions": {"type": "object", "properties": {
            "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"},
                            "description": "One per image, in the order sent: what `fcclass predict --json` gives for the file."},
            "batch_size": {"type": "integer", "description": "Images in the batch this request's images ran in (dynamic batching)."},
            "time_ms": {"type": "number", "description": "Time from the request's arrival to its answer."}}},
        "Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string", "description": "What is wrong, naming the file, and how to fix it."},
            "files": {"type": "array", "items": {"type": "object", "properties": {"file": {"type": "string"}, "error": {"type": "string"}}}}}},
    }


def _predict(limits: Limits) -> dict[str, Any]:
    top_k = {"type": "integer", "minimum": 1, "default": 3}
    return {"post": {
        "summary": "Predict the label of one or more images",
        "description": f"At most {limits.max_files} images and {limits.max_upload_mb:g} MB per request. The preprocessing and the "
                       "numbers are `fcclass predict --json`'s.",
        "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": top_k}],
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}, "top_k": top_k}}},
            "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
                "images": {"type": "array", "items": {"oneOf": [
                    {"type": "string", "contentEncoding": "base64"},
                    {"type": "object", "properties": {"name": {"type": "string"}, "data": {"type": "string", "contentEncoding": "base64"}}}]}},
                "top_k": top_k}}}}},
        "responses": {
            "200": {"description": "The predictions", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Predictions"}}}},
            "400": _error("A malformed multipart form"),
            "401": _error("Missing or wrong X-API-Key (when the server has a key)"),
            "413": _error("The body is over --max-upload-mb, or more images than --max-files"),
            "415": _error("Not an image (or not multipart/JSON)"),
            "422": _error("An empty body, no images, a truncated image, a decompression bomb, bad base64 or top_k"),
            "503": _error("The model is loading, or the request timed out waiting for it"),
        }}}


def schema(limits: Limits) -> dict[str, Any]:
    def get(summary: str, description: str, ok: str = "OK") -> dict[str, Any]:
        return {"get": {"summary": summary, "description": description,
                        "responses": {"200": {"description": ok, "content": {"application/json": {"schema": {"type": "object"}}}}}}}

    paths = {
        "/v1/predict": _predict(limits),
        "/v1/info": get("The served model", "Labels, input shape, preprocessing, run directory, model file and its SHA-256, runtime, "
                                            "precision, and the server's limits."),
        "/healthz": get("Alive", "200 while the process serves requests; needs no API key."),
        "/readyz": get("Ready", "200 once the model is loaded, 503 before (or if loading failed); needs no API key."),
    }
    paths["/readyz"]["get"]["responses"]["503"] = _error("Not ready yet")
    return {
        "openapi": "3.1.0",
        "info": {"title": "fcclass serve", "version": __version__,
                 "description": "A trained fcclass run as a web service. With --api-key, /v1/ endpoints need the X-API-Key header."},
        "paths": paths,
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
    }
