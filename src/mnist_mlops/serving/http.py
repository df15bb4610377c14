"""The HTTP layer in front of every endpoint: error bodies, the guard, the prediction-id header.

`Guard` is an ASGI middleware: the request body limit (413) and the optional API key (401),
and a check that a multipart form carries files only in the fields its endpoint takes. A
single prediction's answer gets its id as the `X-Prediction-Id` header; /docs.json is the
true document (serving/openapi.py), not BentoML's. It also turns the
compact forms into /predict's: a binary body (raw uint8 or `.npy`) and an Open Inference
Protocol `infer` request (serving/oip.py) become /predict's tensor JSON, so one path checks,
batches and logs them all.
"""

from __future__ import annotations

import functools
import hmac
import re
from collections.abc import Callable

from mnist_mlops.config import ServeParams
from mnist_mlops.serving import oip
from mnist_mlops.serving.inputs import BINARY_TYPES, binary_images, predict_body
from mnist_mlops.serving.settings import api_key, open_predict

# Open even with an API key.
OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics", "/ui", *oip.HEALTH})
FILE_FIELDS = {"/predict_image": {"image"}}  # multipart file fields each endpoint takes
PREDICTION_ENDPOINTS = ("/predict", "/predict_image")


def is_open(path: str) -> bool:
    """Health, metrics and the drawing page (a browser cannot send a key to open it)."""
    return path in OPEN_PATHS or path.startswith("/ui/")


def error_body(status: int, kind: str, message: str, loc: str) -> dict:
    """The shape of every error this service returns (the same as BentoML's 400s)."""
    return {"error": message, "detail": [{"type": kind, "loc": [loc], "msg": message}], "status": status}


def error_response(status: int, kind: str, message: str, loc: str = "body"):
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(status, kind, message, loc), status_code=status)


# --------------------------------------------------------------------------- the prediction-id header

PREDICTION_ID = re.compile(rb'"prediction_id":\s*"([0-9a-f]{28})"')


def buffered(send, rewrite):
    """Wrap an ASGI `send`: hold the response until its body is complete, then send what
    `rewrite(start, body)` makes of it (a start message and the whole body). Small bodies only."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def wrapped(message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        new_start, body = rewrite(start, b"".join(chunks))
        start = None
        await send(new_start)
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


def with_prediction_id_header(send):
    """Wrap an ASGI `send`: a response holding exactly one prediction gets `X-Prediction-Id`."""
    def add_id(start: dict, body: bytes) -> tuple[dict, bytes]:
        ids = PREDICTION_ID.findall(body) if start.get("status") == 200 else []
        if len(ids) == 1:
            start = {**start, "headers": [*start.get("headers", []), (b"x-prediction-id", ids[0])]}
        return start, body

    return buffered(send, add_id)


# --------------------------------------------------------------------------- the guard

class BodyTooLarge(Exception):
    """A chunked or multipart body grew past the limit while it was read."""


async def read_body(receive, limit: int) -> bytes | None:
    """The whole request body (None: the client went away); BodyTooLarge past `limit` bytes."""
    chunks, total, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        total += len(body)
        if total > limit:
            raise BodyTooLarge
        chunks.append(body)
        more = message.get("more_body", False)
    return b"".join(chunks)


def replaying(body: bytes, receive):
    """An ASGI `receive` that hands out `body` once, then what the client sends next."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive_again


class Guard:
    """ASGI middleware: the request body limit (413) and the optional API key (401).

    Content-Length over the limit is refused before reading; a chunked body is read up to
    the limit and replayed. With $MNIST_MLOPS_API_KEY set, every path but the health and
    metrics endpoints needs `Authorization: Bearer <key>` or `X-API-Key: <key>`.
    """

    def __init__(self, app, max_body_bytes: int = ServeParams().max_body_bytes,
                 document: Callable[[], dict] | None = None) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.document = functools.cache(document) if document else None  # the true /docs.json
        self.api_key = api_key()
        self.open_predict = open_predict()  # `serve --open-predict`: predictions open, labels keyed

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        key = self.api_key.encode()
        bearer = headers.get(b"authorization", b"")
        given = bearer[7:].strip() if bearer[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(given, key)

    def too_big(self):
        return error_response(413, "body_too_large", f"request body over {self.max_body} bytes")

    def refusal(self, path: str, headers: dict[bytes, bytes]):
        """The error response for a request refused on its headers alone (None: let it in)."""
        predicting = path.rstrip("/") in PREDICTION_ENDPOINTS or oip.infer_target(path) is not None
        needs_key = not is_open(path) and not (self.open_predict and predicting)
        if self.api_key and needs_key and not self.authorized(headers):
            resp = error_response(401, "unauthorized", "missing or wrong API key: send 'Authorization: "
                                  "Bearer <key>' or 'X-API-Key: <key>'", "header")
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
        length = headers.get(b"content-length")
        if length is None:
            return None
        try:
            n = int(length)
        except ValueError:
            return error_response(400, "bad_header", "invalid Content-Length")
        return self.too_big() if n > self.max_body else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, post = dict(scope["headers"]), scope.get("method") == "POST"
        if post and scope["path"].rstrip("/") in PREDICTION_ENDPOINTS:
            send = with_prediction_id_header(send)
        if (refused := self.refusal(scope["path"], headers)) is not None:
            return await refused(scope, receive, send)
        if scope["path"] == "/docs.json" and self.document is not None and scope.get("method") == "GET":
            from starlette.responses import JSONResponse

            return await JSONResponse(self.document())(scope, receive, send)
        if post and (target := oip.infer_target(scope["path"])) is not None:
            return await self.infer(target, scope, receive, send, headers)
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
        if post and scope["path"].rstrip("/") == "/predict" and media in BINARY_TYPES:
            return await self.binary_predict(media, scope, receive, send)
        multipart = media == "multipart/form-data"
        if not post or (b"content-length" in headers and not multipart):
            return await self.app(scope, receive, send)
        # Chunked or multipart: read the body (up to the limit) here, then replay it.
        if (body := await self.whole_body(scope, receive, send)) is None:
            return
        if multipart and (problem := await self.unexpected_files(scope, replaying(body, receive))):
            return await error_response(400, "unexpected_file", problem)(scope, receive, send)
        return await self.app(scope, replaying(body, receive), send)

    async def whole_body(self, scope, receive, send) -> bytes | None:
        """The request body, or None when the client left or it was over the limit (answered 413)."""
        try:
            return await read_body(receive, self.max_body)
        except BodyTooLarge:
            await self.too_big()(scope, receive, send)
            return None

    async def as_predict(self, images, scope, receive, send) -> None:
        """Hand `images` to /predict in the tensor form: the same checks, batcher and log."""
        body = predict_body(images)
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        scope = {**scope, "path": "/predict", "raw_path": b"/predict", "query_string": b"",
                 "headers": [*headers, (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}
        await self.app(scope, replaying(body, receive), send)

    async def binary_predict(self, media: str, scope, receive, send) -> None:
        """POST /predict with raw uint8 pixels or a `.npy` file."""
        if (body := await self.whole_body(scope, receive, send)) is None:
            return
        try:
            images = binary_images(body, media)
        except ValueError as exc:
            return await error_response(400, "invalid_images", str(exc))(scope, receive, send)
        await self.as_predict(images, scope, receive, send)

    async def infer(self, target: tuple[str, str | None], scope, receive, send, headers) -> None:
        """An Open Inference Protocol infer request, answered by /predict and rewritten."""
        from starlette.responses import Response

        if (body := await self.whole_body(scope, receive, send)) is None:
            return
        try:
            oip.check_target(*target, oip.serving_version())
            request = oip.parse_infer(body, headers.get(oip.HEADER_LENGTH))
        except oip.BadInference as exc:
            refusal = Response(oip.error(str(exc)), exc.status, media_type="application/json")
            return await refusal(scope, receive, send)
        await self.as_predict(request.images, scope, receive, buffered(send, oip.rewriting(request)))

    @staticmethod
    async def unexpected_files(scope, receive) -> str | None:
        """A file in a field the endpoint does not take (BentoML would answer 500), or a bad form."""
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        allowed = FILE_FIELDS.get(scope["path"].rstrip("/"), set())
        try:
            form = await Request(scope, receive).form()
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's malformed form
            return f"malformed multipart form: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        try:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile) and name not in allowed:
                    expected = f"send the file as field {', '.join(sorted(allowed))!s}" if allowed else \
                        "this endpoint takes JSON"
                    return f"unexpected file in field '{name}': {expected}"
        finally:
            await form.close()
        return None
