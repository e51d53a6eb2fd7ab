"""The HTTP transports: ``/v1/classify`` and the Open Inference Protocol's REST ``infer``.

One :class:`httpx.Client` (a connection pool, thread-safe) serves every worker thread. Each image
is its own request, so a bad image fails alone and the rest of a folder is still classified.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import orjson

from service.client.base import (
    Classification,
    Fatal,
    Prediction,
    RequestFailed,
    Unreachable,
    only_ready_model,
    parse_classification,
)
from service.protocols import oip

#: Statuses that mean the request cannot succeed for any image (wrong URL or model): stop.
FATAL_STATUSES = frozenset({401, 403, 404, 405})
#: Statuses whose Retry-After the client obeys.
RETRY_STATUSES = frozenset({429, 503})


class HttpTransport:
    """What both HTTP protocols share: the connection pool, sending, and reading errors."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        concurrency: int,
        top_k: int,
        model: str | None,
        version: str | None,
    ) -> None:
        self.url = url
        self.top_k = top_k
        self.model = model
        self.version = version
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.http = httpx.Client(base_url=url, timeout=timeout_s, limits=limits)

    def close(self) -> None:
        self.http.close()

    def resolve_model(self) -> None:
        """Nothing to resolve: subclasses that need a model name override this."""

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response, if 2xx; otherwise the server's error as :class:`RequestFailed`."""
        try:
            response = self.http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as exc:
            raise Unreachable(f"cannot reach {self.url}: {_reason(exc)}") from None
        except httpx.TimeoutException:
            timeout = self.http.timeout.read
            raise RequestFailed(f"no answer within {timeout:g} s (--timeout)") from None
        except httpx.HTTPError as exc:
            raise RequestFailed(f"the request failed: {_reason(exc)}") from None
        if response.is_success:
            return response
        raise _error(response)

    @staticmethod
    def json(response: httpx.Response, content: bytes | None = None) -> Any:
        try:
            return orjson.loads(response.content if content is None else content)
        except orjson.JSONDecodeError:
            raise RequestFailed(
                f"the server's answer is not JSON ({response.headers.get('content-type')})"
            ) from None


def _reason(exc: Exception) -> str:
    # httpx wraps the socket error; its text ("[Errno 111] Connection refused") is the useful part.
    return str(exc) or type(exc).__name__


def _error(response: httpx.Response) -> RequestFailed:
    """The server's error: ``/v1`` says ``{"error": code, "detail": sentence}``, OIP says
    ``{"error": sentence}``; anything else (a proxy's page) is shown by its status line."""
    status = response.status_code
    code, message = None, None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        if isinstance(body.get("detail"), str):
            code, message = body["error"], body["detail"]
        else:
            message = body["error"]
    if message is None:
        text = response.text.strip().replace("\n", " ")[:200]
        message = f"{response.reason_phrase or 'error'}" + (f": {text}" if text else "")
    retry_after = None
    if status in RETRY_STATUSES and "retry-after" in response.headers:
        try:
            retry_after = float(response.headers["retry-after"])
        except ValueError:  # an HTTP date: not worth parsing for a command-line client
            retry_after = 1.0
    kind = Fatal if status in FATAL_STATUSES else RequestFailed
    return kind(message, status=status, code=code, retry_after_s=retry_after)


class V1Transport(HttpTransport):
    """``POST /v1/classify?top_k=K``: the image as the raw body (multipart when its type is not
    known from its name, so the server sniffs it)."""

    def classify(self, name: str, data: bytes, content_type: str | None) -> Classification:
        params: dict[str, Any] = {"top_k": self.top_k}
        if self.model:
            params["model"] = self.model
        if self.version:
            params["version"] = self.version
        if content_type:
            kwargs: dict[str, Any] = {"content": data, "headers": {"Content-Type": content_type}}
        else:
            kwargs = {"files": {"file": (name, data, "application/octet-stream")}}
        doc = self.json(self.send("POST", "/v1/classify", params=params, **kwargs))
        try:
            model = doc["model"]
            predictions = [
                Prediction(label=p["label"], index=p["index"], probability=p["probability"])
                for p in doc["results"][0]["predictions"]
            ]
            return Classification(model["name"], model["version"], predictions)
        except (KeyError, IndexError, TypeError):
            raise RequestFailed("the server's answer is not a /v1/classify response") from None


class OIPTransport(HttpTransport):
    """``POST /v2/models/{name}[/versions/{v}]/infer`` with the image as BYTES binary tensor
    data and Triton's classification extension on the ``probabilities`` output."""

    def resolve_model(self) -> None:
        if self.model:
            return
        try:
            self.model = self.json(self.send("GET", "/v1/models"))["name"]
            return
        except Fatal:
            pass  # not a sepconv server (Triton, KServe): ask the repository index
        except (KeyError, TypeError):
            raise Fatal("GET /v1/models did not name a model; give --model") from None
        try:
            index = self.json(self.send("POST", "/v2/repository/index", json={"ready": True}))
        except Fatal:
            raise Fatal("the server does not say which model it serves; give --model") from None
        if not isinstance(index, list) or not all(isinstance(m, dict) for m in index):
            raise Fatal("the repository index is not a list of models; give --model")
        self.model = only_ready_model([(m.get("name", ""), m.get("state", "")) for m in index])

    def classify(self, name: str, data: bytes, content_type: str | None) -> Classification:
        path = f"/v2/models/{quote(self.model, safe='')}"
        if self.version:
            path += f"/versions/{quote(self.version, safe='')}"
        blob = oip.serialize_bytes([data])
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": oip.IMAGE_INPUT,
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": len(blob)},
                    }
                ],
                "outputs": [
                    {
                        "name": oip.OUTPUT_NAME,
                        "parameters": {"classification": self.top_k, "binary_data": False},
                    }
                ],
            }
        )
        response = self.send(
            "POST",
            f"{path}/infer",
            content=header + blob,
            headers={
                oip.HEADER_LENGTH: str(len(header)),
                "Content-Type": oip.BINARY_CONTENT_TYPE,
            },
        )
        return Classification(*self._read(response))

    def _read(self, response: httpx.Response) -> tuple[str, str, list[Prediction]]:
        # Asked for JSON data, but a server may still answer binary: read both forms.
        length = response.headers.get(oip.HEADER_LENGTH)
        body = response.content
        try:
            json_len = int(length) if length is not None else len(body)
            doc = self.json(response, body[:json_len])
            (output,) = [o for o in doc["outputs"] if o["name"] == oip.OUTPUT_NAME]
            if "data" in output:
                strings = [str(s) for s in output["data"]]
            else:
                size = output["parameters"]["binary_data_size"]
                raw = body[json_len : json_len + size]
                strings = [s.decode() for s in oip.deserialize_bytes(raw, oip.OUTPUT_NAME)]
            return (
                doc["model_name"],
                str(doc.get("model_version", "")),
                parse_classification(strings),
            )
        except (KeyError, ValueError, TypeError, UnicodeDecodeError, oip.OIPError):
            raise RequestFailed("the server's answer is not an OIP classification") from None
