"""HTTP framing of the simulator: vLLM's routes, bodies, SSE streams and status codes."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from loractl.flags import listen
from simulator.faults import ErrorRateRequest, LatencyRequest, RestartRequest, UnhealthyRequest
from simulator.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    RequestError,
    StreamOptions,
    UnloadLoRAAdapterRequest,
    error_response,
    json_body,
    parse_body,
    validation_error,
)
from simulator.service import PlannedChoice, Simulator, Target
from simulator.textgen import chat_prompt_tokens, count_tokens

log = structlog.get_logger("simulator")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SIMULATOR_KEY = web.AppKey("simulator", Simulator)
SERVER_KEY: web.AppKey[SimServer] = web.AppKey("server")
METRICS_CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"  # what vLLM 0.32 sends
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


@web.middleware
async def vllm_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Shape every error the way vLLM (FastAPI) does, and keep serving after any of them."""
    try:
        return await handler(request)
    except RequestError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status >= 400:
            return json_body({"detail": exc.reason}, status=exc.status)
        raise
    except Exception as exc:
        log.exception("request_failed", path=request.path)
        return error_response(
            HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError", f"{type(exc).__name__}: {exc}"
        )


def api_key_guard(api_key: str | None) -> Middleware:
    expected = f"Bearer {api_key}"

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        # vLLM protects only the OpenAI routes; /health and /metrics stay open for probes.
        if (
            api_key
            and request.path.startswith("/v1")
            and request.method != "OPTIONS"
            and request.headers.get("Authorization") != expected
        ):
            return json_body({"error": "Unauthorized"}, status=401)
        return await handler(request)

    return guard


def _sim(request: web.Request) -> Simulator:
    return request.app[SIMULATOR_KEY]


# --- probes and listings --------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    if not _sim(request).faults.healthy():
        return web.Response(status=HTTPStatus.SERVICE_UNAVAILABLE)
    return web.Response(status=HTTPStatus.OK)


async def version(request: web.Request) -> web.Response:
    return json_body({"version": _sim(request).settings.vllm_version})


async def models(request: web.Request) -> web.Response:
    return json_body(_sim(request).model_cards())


async def metrics(request: web.Request) -> web.Response:
    # As vLLM (0.32): /metrics is its instrumentator's whole page, whatever the query;
    # prometheus_client's app, mounted behind it at /metrics/, honours `name[]`.
    families = request.query.getall("name[]", []) if request.path == "/metrics/" else None
    return web.Response(
        body=_sim(request).metrics.render(families),
        headers={"Content-Type": METRICS_CONTENT_TYPE},
    )


# --- adapters -------------------------------------------------------------------------


class UntypedText(web.Response):
    """vLLM's load and unload handlers return a bare string: a body with no content-type
    (aiohttp would otherwise label it application/octet-stream)."""

    def __init__(self, text: str) -> None:
        super().__init__(body=text.encode())

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self._headers.popall(hdrs.CONTENT_TYPE, None)


async def load_lora_adapter(request: web.Request) -> web.Response:
    body = await parse_body(request, LoadLoRAAdapterRequest)
    text = await _sim(request).load_adapter(body.lora_name, body.lora_path, body.load_inplace)
    log.info("lora_loaded", lora_name=body.lora_name, lora_path=body.lora_path)
    return UntypedText(text)


async def unload_lora_adapter(request: web.Request) -> web.Response:
    body = await parse_body(request, UnloadLoRAAdapterRequest)
    text = _sim(request).unload_adapter(body.lora_name)
    log.info("lora_unloaded", lora_name=body.lora_name)
    return UntypedText(text)


# --- generation -----------------------------------------------------------------------


def _prompt_list(
    prompt: str | list[str] | list[int] | list[list[int]] | None,
) -> list[tuple[str, int]]:
    """(text, token count) per prompt; token-id prompts count their ids."""
    if prompt is None or prompt == "":
        raise validation_error(
            "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
        )
    if isinstance(prompt, str):
        return [(prompt, count_tokens(prompt))]
    if not prompt:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, "BadRequestError", "You must pass at least one prompt"
        )
    if all(isinstance(p, int) for p in prompt):
        return [(" ".join(map(str, prompt)), len(prompt))]
    prompts = [
        (p, count_tokens(p)) if isinstance(p, str) else (" ".join(map(str, p)), len(p))
        for p in prompt
        if not isinstance(p, int)
    ]
    if any(tokens == 0 for _, tokens in prompts):
        raise RequestError(
            HTTPStatus.BAD_REQUEST, "BadRequestError", "The decoder prompt cannot be empty"
        )
    return prompts


def _chat_prompt(request: ChatCompletionRequest) -> tuple[str, int]:
    if not request.messages:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            "BadRequestError",
            "Cannot apply chat template to an empty conversation. Provide at least one message.",
        )
    contents = []
    for message in request.messages:
        if isinstance(message.content, str):
            contents.append(message.content)
        elif message.content:
            contents.append(" ".join(str(part.get("text", "")) for part in message.content))
    return "\n".join(contents), chat_prompt_tokens(contents)


def _usage(prompt_tokens: int, choices: list[PlannedChoice], details: bool) -> dict[str, Any]:
    completion = sum(len(c.tokens) for c in choices)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion,
        "completion_tokens": completion,
    }
    if details:  # the final usage chunk of a stream carries the three counts only
        usage.update(prompt_tokens_details=None, completion_tokens_details=None)
    return usage


class Generation:
    """One completion or chat request on its way through the engine."""

    def __init__(
        self,
        sim: Simulator,
        *,
        chat: bool,
        target: Target,
        prompts: list[tuple[str, int]],
        max_tokens: int | None,
        n: int,
        temperature: float | None,
        max_tokens_param: str = "max_tokens",
    ) -> None:
        self.sim = sim
        self.chat = chat
        self.target = target
        self.prompt_tokens = sum(tokens for _, tokens in prompts)
        self.choices = sim.plan_choices(
            target, prompts, max_tokens, n, temperature, max_tokens_param
        )
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(8)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.target.name,
            "choices": choices,
        }

    async def respond(self) -> web.Response:
        await self.sim.run_all(self.choices)
        choices = []
        for index, choice in enumerate(self.choices):
            text = "".join(choice.tokens)
            body: dict[str, Any] = {"index": index}
            if self.chat:
                body["message"] = {"role": "assistant", "content": text, "refusal": None,
                                   "annotations": None, "audio": None, "function_call": None,
                                   "reasoning": None}  # fmt: skip
            else:
                body["text"] = text
            body.update(logprobs=None, finish_reason=choice.seq.finish_reason, stop_reason=None,
                        token_ids=None)  # fmt: skip
            if not self.chat:
                body.update(prompt_logprobs=None, prompt_token_ids=None)
            body["routed_experts"] = None
            choices.append(body)
        payload = self._envelope(self.object, choices)
        payload.update(service_tier=None, system_fingerprint=self.sim.fingerprint,
                       usage=_usage(self.prompt_tokens, self.choices, details=True))  # fmt: skip
        if self.chat:
            payload.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        payload.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
        return json_body(payload)

    async def stream(self, request: web.Request, include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        chunk_object = "chat.completion.chunk" if self.chat else "text_completion"
        for index, choice in enumerate(self.choices):
            final_choice = index == len(self.choices) - 1
            if self.chat:
                role = {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                opening = self._envelope(chunk_object, [role])
                opening.update(prompt_token_ids=None, prompt_text=None)
                await _send(response, opening)
            async with aclosing(self.sim.engine.generate(choice.seq)) as produced:
                async for position in produced:
                    chunk = self._token_chunk(chunk_object, index, choice, position)
                    last = position == len(choice.tokens) - 1
                    if last and final_choice and not include_usage:
                        chunk["system_fingerprint"] = self.sim.fingerprint
                    await _send(response, chunk)
        if include_usage:
            final = self._envelope(chunk_object, [])
            final["usage"] = _usage(self.prompt_tokens, self.choices, details=False)
            final["system_fingerprint"] = self.sim.fingerprint
            await _send(response, final)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _token_chunk(
        self, chunk_object: str, index: int, choice: PlannedChoice, position: int
    ) -> dict[str, Any]:
        """One token as vLLM streams it (the stop reason only on a choice's last token)."""
        last = position == len(choice.tokens) - 1
        token = choice.tokens[position]
        body: dict[str, Any] = {"index": index}
        if self.chat:
            body.update(delta={"content": token}, logprobs=None,
                        finish_reason=choice.seq.finish_reason if last else None)  # fmt: skip
            if last:
                body["stop_reason"] = None
            body["token_ids"] = None
        else:
            body.update(text=token, logprobs=None,
                        finish_reason=choice.seq.finish_reason if last else None,
                        stop_reason=None, prompt_token_ids=None, token_ids=None)  # fmt: skip
        return self._envelope(chunk_object, [body])


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    await response.write(b"data: " + data.encode() + b"\n\n")


def _include_usage(sim: Simulator, options: StreamOptions | None) -> bool:
    return sim.settings.force_include_usage or bool(options and options.include_usage)


async def completions(request: web.Request) -> web.StreamResponse:
    sim = _sim(request)
    body = await parse_body(request, CompletionRequest)
    target = sim.resolve(body.model)
    sim.check_injected_error(body.model)
    generation = Generation(
        sim,
        chat=False,
        target=target,
        prompts=_prompt_list(body.prompt),
        max_tokens=body.max_tokens,
        n=body.n,
        temperature=body.temperature,
    )
    if body.stream:
        return await generation.stream(request, _include_usage(sim, body.stream_options))
    return await generation.respond()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    sim = _sim(request)
    body = await parse_body(request, ChatCompletionRequest)
    target = sim.resolve(body.model)
    sim.check_injected_error(body.model)
    # vLLM names the field the client used when it refuses the value.
    param = "max_completion_tokens" if body.max_tokens is None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    generation = Generation(
        sim,
        chat=True,
        target=target,
        prompts=[_chat_prompt(body)],
        max_tokens=max_tokens,
        n=body.n,
        temperature=body.temperature,
        max_tokens_param=param,
    )
    if body.stream:
        return await generation.stream(request, _include_usage(sim, body.stream_options))
    return await generation.respond()


# --- fault injection (/sim/...) -------------------------------------------------------


async def sim_restart(request: web.Request) -> web.Response:
    body = await parse_body(request, RestartRequest)
    server = request.app[SERVER_KEY]
    server.schedule_restart(body.downtime_seconds)
    return json_body({"restarting": True, "downtime_seconds": body.downtime_seconds})


async def sim_unhealthy(request: web.Request) -> web.Response:
    body = await parse_body(request, UnhealthyRequest)
    _sim(request).faults.make_unhealthy(body.seconds)
    return json_body({"unhealthy_seconds": body.seconds})


async def sim_error_rate(request: web.Request) -> web.Response:
    body = await parse_body(request, ErrorRateRequest)
    _sim(request).faults.set_error_rate(body.model, body.rate, body.status)
    return json_body(body.model_dump())


async def sim_latency(request: web.Request) -> web.Response:
    body = await parse_body(request, LatencyRequest)
    _sim(request).engine.extra_latency_ms = body.extra_ms
    return json_body(body.model_dump())


async def sim_clear_faults(request: web.Request) -> web.Response:
    sim = _sim(request)
    sim.faults.clear()
    sim.engine.extra_latency_ms = 0.0
    return json_body({"cleared": True})


async def sim_state(request: web.Request) -> web.Response:
    return json_body(_sim(request).state())


def build_app(sim: Simulator, server: SimServer) -> web.Application:
    app = web.Application(
        middlewares=[vllm_errors, api_key_guard(sim.settings.api_key)],
        client_max_size=64 * 1024 * 1024,
    )
    app[SIMULATOR_KEY] = sim
    app[SERVER_KEY] = server
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)  # vLLM's SageMaker-style alias of /health
    app.router.add_post("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/metrics/", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    if sim.settings.runtime_lora_updating:
        app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
        app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    app.router.add_post("/sim/restart", sim_restart)
    app.router.add_post("/sim/unhealthy", sim_unhealthy)
    app.router.add_post("/sim/error-rate", sim_error_rate)
    app.router.add_post("/sim/latency", sim_latency)
    app.router.add_delete("/sim/faults", sim_clear_faults)
    app.router.add_get("/sim/state", sim_state)
    return app


class SimServer:
    """Owns the listening socket, so a simulated restart can refuse connections meanwhile."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.app = build_app(sim, self)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        self.port = sim.settings.port
        self._site: web.TCPSite | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        self._site = web.TCPSite(self.runner, self.sim.settings.host, self.port)
        await listen(self._site.start, "--port", self.sim.settings.host, self.port)
        server = self._site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    def schedule_restart(self, downtime_seconds: float) -> None:
        task = asyncio.get_running_loop().create_task(self._restart(downtime_seconds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, downtime_seconds: float) -> None:
        await asyncio.sleep(0.05)  # let the /sim/restart answer leave first
        log.info("simulated_restart", downtime_seconds=downtime_seconds)
        if self._site is not None:
            await self._site.stop()
        if self.runner.server is not None:
            await self.runner.server.shutdown(0.05)  # drop kept-alive connections too
        self.sim.restart()
        await asyncio.sleep(downtime_seconds)
        await self._listen()
        log.info("listening", host=self.sim.settings.host, port=self.port)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.runner.cleanup()
