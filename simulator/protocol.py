"""Request bodies and error bodies exactly as vLLM's OpenAI server shapes them."""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

RequestModel = TypeVar("RequestModel", bound=BaseModel)


class OpenAIRequest(BaseModel):
    # vLLM accepts and ignores fields it does not know (it only logs a warning).
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class CompletionRequest(OpenAIRequest):
    model: str | None = None
    # Optional in vLLM too (prompt_embeds may stand in); missing or empty is refused later
    # as a BadRequestError, not by the schema.
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    max_tokens: int | None = 16
    temperature: float | None = None
    n: int = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ChatMessage(OpenAIRequest):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(OpenAIRequest):
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    n: int = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = Field(default=None)


class RequestError(Exception):
    """An error that becomes a vLLM error body: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: HTTPStatus, err_type: str, message: str, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message
        self.param = param

    def response(self) -> web.Response:
        return error_response(self.status, self.err_type, self.message, self.param)


def validation_error(message: str, parameter: str | None = None, value: Any = None) -> RequestError:
    """vLLM's VLLMValidationError: a 400 BadRequestError whose message ends with the
    parameter and the rejected value, e.g. "... (parameter=max_tokens, value=0)"."""
    extras = []
    if parameter is not None:
        extras.append(f"parameter={parameter}")
    if value is not None:
        extras.append(f"value={value}")
    text = f"{message} ({', '.join(extras)})" if extras else message
    return RequestError(HTTPStatus.BAD_REQUEST, "BadRequestError", text, parameter)


def json_body(payload: Any, status: int = 200) -> web.Response:
    """JSON the way vLLM's FastAPI answers: compact, `application/json` without a charset."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return web.Response(
        body=text.encode(), status=status, headers={"Content-Type": "application/json"}
    )


def sanitize_message(message: str) -> str:
    """vLLM strips memory addresses, tracebacks and file paths from every error message it
    returns, so a path under a system root comes back as `<path>`."""
    message = re.sub(r" at 0x[0-9a-fA-F]+>", ">", message)
    message = re.sub(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?', "", message)
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    message = re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message)
    return message.strip()


def error_response(
    status: HTTPStatus, err_type: str, message: str, param: str | None = None
) -> web.Response:
    body = {
        "error": {
            "message": sanitize_message(message),
            "type": err_type,
            "param": param,
            "code": int(status),
        }
    }
    return json_body(body, status=int(status))


def not_found_model(model: str, served_names: tuple[str, ...]) -> RequestError:
    return RequestError(
        HTTPStatus.NOT_FOUND,
        "NotFoundError",
        f"The model `{model}` does not exist. Valid aliases: {', '.join(served_names)}.",
        "model",
    )


async def parse_body(request: web.Request, model: type[RequestModel]) -> RequestModel:
    """Validate a JSON body like FastAPI does inside vLLM: any problem is a 400 "Bad Request"
    listing pydantic's errors, whose `param` names the first offending field (`body.<field>`)."""
    raw = await request.read()
    if not raw:
        raise _request_validation([{"type": "missing", "loc": ("body",),
                                    "msg": "Field required", "input": None}])  # fmt: skip
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        error = {
            "type": "json_invalid",
            "loc": ("body", getattr(exc, "pos", 0)),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": getattr(exc, "msg", str(exc))},
        }
        raise _request_validation([error]) from exc
    if not isinstance(data, dict):
        raise _request_validation([{
            "type": "model_attributes_type", "loc": ("body",),
            "msg": "Input should be a valid dictionary or object to extract fields from",
            "input": data,
        }])  # fmt: skip
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {key: value for key, value in error.items() if key != "ctx" or value}
            | {"loc": ("body", *error["loc"])}
            for error in exc.errors(include_url=False, include_context=True)
        ]
        raise _request_validation(errors) from exc


# Pydantic's names for union branches and wrappers in `loc`: vLLM drops them from `param`.
_INTERNAL_LOC = re.compile(r"[\[\]{}()]|^(?:str|int|float|bool|list|dict|none|tuple)$", re.I)
_MAX_REPORTED_ERRORS = 10
_MAX_INPUT_CHARS = 200


def _request_validation(errors: list[dict[str, Any]]) -> RequestError:
    """vLLM's handler for FastAPI's RequestValidationError, message and all."""
    lines = [f"  {_format_error(error)}" for error in errors[:_MAX_REPORTED_ERRORS]]
    label = "error" if len(errors) == 1 else "errors"
    if len(errors) > _MAX_REPORTED_ERRORS:
        lines.append(f"  ...and {len(errors) - _MAX_REPORTED_ERRORS} more {label}")
    message = f"{len(errors)} validation {label}:\n" + "\n".join(lines)
    param = _clean_loc(errors[0]["loc"]) if errors else None
    return RequestError(HTTPStatus.BAD_REQUEST, HTTPStatus.BAD_REQUEST.phrase, message, param)


def _clean_loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not _INTERNAL_LOC.search(str(p))]
    return ".".join(parts or [str(p) for p in loc])


def _format_error(error: dict[str, Any]) -> str:
    shown = dict(error)
    shown["input"] = _summarize(error.get("input"))
    shown["loc"] = _clean_loc(tuple(error["loc"]))
    if "ctx" in shown:
        shown["ctx"] = {k: str(v) for k, v in shown["ctx"].items()}
    return str(shown)


def _summarize(value: Any) -> str:
    if isinstance(value, str):
        return (
            value if len(value) <= _MAX_INPUT_CHARS else value[:_MAX_INPUT_CHARS] + "...[truncated]"
        )
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text if len(text) <= _MAX_INPUT_CHARS else text[:_MAX_INPUT_CHARS] + "...[truncated]"
