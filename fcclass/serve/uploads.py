"""What a prediction request holds: image files from a multipart form (the repeatable field ``files``) or from JSON
(``{"images": [base64, ...]}``), and ``top_k``; every way it can be wrong is an ``ApiError`` with the 4xx status
and a message naming the file and the cause. The body's size is capped while it is read (``BodyLimit``)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

EMPTY = "The request body is empty: send images as multipart form files (field 'files') or as JSON {\"images\": [base64, ...]}."
FIELDS = ("files", "file")  # the form field; "file" too, as curl users often write -F file=@x.png


@dataclass
class ApiError(Exception):
    status: int
    message: str
    files: list[dict[str, str]] = field(default_factory=list)  # [{"file": name, "error": cause}]

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.message}
        if self.files:
            body["files"] = self.files
        return JSONResponse(body, status_code=self.status)


class BodyTooLarge(Exception):
    pass


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is over the server's limit of {limit / 1024 / 1024:g} MB (--max-upload-mb); "
                         "send fewer or smaller images per request.")


class BodyLimit:
    """Refuses a body over ``limit`` bytes with 413: at once when its Content-Length says so, else as soon as that
    much of it has arrived (a chunked upload), without reading the rest."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await too_large(self.limit).response()(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


def top_k_value(raw: Any) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = 0
    if isinstance(raw, bool) or value < 1 or str(value) != str(raw).strip():
        raise ApiError(422, f"top_k must be a whole number of at least 1, not {str(raw)[:40]!r}.")
    return value


async def read_images(request: Request, max_files: int) -> tuple[list[tuple[str, bytes]], int | None]:
    """The request's images as (name, bytes), in the order sent, and its top_k (None: not given)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.headers.get("content-length") == "0":
        raise ApiError(422, EMPTY)
    if kind == "multipart/form-data":
        images, top_k = await _form_images(request, max_files)
    elif kind == "application/json":
        images, top_k = _json_images(await request.body())
    elif not await request.body():
        raise ApiError(422, EMPTY)
    else:
        raise ApiError(415, f"Content type '{kind or 'none'}' is not accepted: send images as multipart/form-data (field "
                            "'files') or application/json with {\"images\": [base64, ...]}.")
    query_k = top_k_value(request.query_params.get("top_k"))
    if not images:
        raise ApiError(422, "The request holds no images: send one or more files in the form field 'files', or JSON "
                            '{"images": [base64, ...]}.')
    if len(images) > max_files:
        raise ApiError(413, f"{len(images)} images in one request; this server takes at most {max_files} (--max-files). Split them "
                            "into several requests.")
    return images, top_k if top_k is not None else query_k


async def _form_images(request: Request, max_files: int) -> tuple[list[tuple[str, bytes]], int | None]:
    # Starlette's parser, called directly, so that its complaints are told apart from the others (and files past the
    # limit are not spooled to disk): one file more than allowed is kept, to be refused with the count.
    parser = MultiPartParser(request.headers, request.stream(), max_files=max_files + 1, max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        many = e.message.startswith("Too many files")
        raise ApiError(413 if many else 400, f"More than {max_files} images in one request; this server takes at most {max_files} "
                                             "(--max-files)." if many else f"The multipart form cannot be read: {e.message}") from None
    try:
        images = []
        for key, value in form.multi_items():
            if key in FIELDS:
                if not isinstance(value, UploadFile):
                    raise ApiError(422, f"Form field '{key}' holds text, not a file: send it as a file (curl -F 'files=@image.png').")
                images.append((value.filename or f"{key}[{len(images)}]", await value.read()))
        return images, top_k_value(form.get("top_k"))
    finally:
        await form.close()


def _json_images(body: bytes) -> tuple[list[tuple[str, bytes]], int | None]:
    try:
        data = json.loads(body)
    except ValueError as e:
        raise ApiError(422, f"The body is not valid JSON ({e}).") from None
    items = data.get("images") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ApiError(422, 'The JSON body must be an object with "images": a list of base64 strings (or of {"name", "data"} objects).')
    images = []
    for i, item in enumerate(items):
        name, text = (item.get("name"), item.get("data")) if isinstance(item, dict) else (None, item)
        name = str(name) if name else f"images[{i}]"
        if not isinstance(text, str):
            raise ApiError(422, f"{name}: not a base64 string.", [{"file": name, "error": "not a base64 string"}])
        if text.startswith("data:") and "," in text:  # a data: URL, as a browser's FileReader gives
            text = text.split(",", 1)[1]
        try:
            images.append((name, base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise ApiError(422, f"{name}: not valid base64.", [{"file": name, "error": "not valid base64"}]) from None
    return images, top_k_value(data.get("top_k"))
