"""Request bodies and error bodies exactly as vLLM's OpenAI server shapes them."""

from __future__ import annotations

import json
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
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
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


def error_response(
    status: HTTPStatus, err_type: str, message: str, param: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": int(status)}}
    return web.json_response(body, status=int(status))


def not_found_model(model: str) -> RequestError:
    return RequestError(
        HTTPStatus.NOT_FOUND, "NotFoundError", f"The model `{model}` does not exist.", "model"
    )


async def parse_body(request: web.Request, model: type[RequestModel]) -> RequestModel:
    """Validate a JSON body like FastAPI does inside vLLM: any problem is a 400 "Bad Request"
    whose `param` names the offending field as `body.<field>`."""
    raw = await request.read()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            HTTPStatus.BAD_REQUEST.phrase,
            f"JSON decode error at position {getattr(exc, 'pos', 0)}: {exc}",
            "body",
        ) from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # Top-level field only: deeper parts of pydantic's loc name union members.
        location = f"body.{errors[0]['loc'][0]}" if errors[0]["loc"] else "body"
        message = "; ".join(
            f"{'.'.join(str(p) for p in ('body', *e['loc']))}: {e['msg']}" for e in errors
        )
        raise RequestError(
            HTTPStatus.BAD_REQUEST, HTTPStatus.BAD_REQUEST.phrase, message, location
        ) from exc
