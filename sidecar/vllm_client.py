"""The vLLM calls loractl makes, with every answer classified into a FailureReason.

The sidecar owns this client; the controller imports it. Status codes and error
bodies follow the vLLM contract (DESIGN §2): the current nested
`{"error": {...}}` body and the older flat `{"object": "error", ...}` both parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httpx

from sidecar.failures import AdapterFailure, FailureReason

RUNTIME_UPDATING_OFF = (
    "vLLM has no runtime LoRA routes: start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=true "
    "and --enable-lora"
)
UNAUTHORIZED = "vLLM answered 401: pass its API key with --api-key or VLLM_API_KEY"


@dataclass(frozen=True)
class VLLMError:
    """An error answer from vLLM, whichever body shape it came in."""

    status: int
    type: str | None
    message: str

    @classmethod
    def from_response(cls, response: httpx.Response) -> VLLMError:
        try:
            body: Any = response.json()
        except ValueError:
            return cls(response.status_code, None, response.text.strip()[:500])
        if isinstance(body, dict):
            inner = body.get("error")
            if isinstance(inner, dict):
                body = inner
            detail = body.get("message") or body.get("detail") or inner
            return cls(response.status_code, body.get("type"), str(detail))
        return cls(response.status_code, None, str(body)[:500])


# What vLLM's worker says (as a 500 "Call to add_lora method failed: ...") when the adapter
# itself is unusable; retrying such a load cannot help.
WORKER_REFUSALS = (
    "Missing required configuration fields",
    "must be a positive integer",
    "doesn't contain tensors",
    "does not support",
    "does not yet support",
    "is not supported",
    "expected target modules",
)


def classify_load_error(error: VLLMError, adapter: str, path: str) -> AdapterFailure:
    """Turn a failed load answer into the reason an operator acts on."""
    if error.status == HTTPStatus.NOT_FOUND and error.type is None:
        return AdapterFailure(FailureReason.CONFIGURATION, RUNTIME_UPDATING_OFF)
    if error.status == HTTPStatus.UNAUTHORIZED:
        return AdapterFailure(FailureReason.CONFIGURATION, UNAUTHORIZED)
    if error.status == HTTPStatus.NOT_FOUND:
        return AdapterFailure(
            FailureReason.BAD_ARTIFACT,
            f"vLLM found no adapter at {path} for {adapter}: {error.message}",
        )
    if "max_lora_rank" in error.message:
        return AdapterFailure(
            FailureReason.BAD_ARTIFACT,
            f"{adapter}: {error.message.split(', please check')[0]} — raise vLLM's "
            "--max-lora-rank or use a lower-rank adapter",
        )
    if error.status < HTTPStatus.INTERNAL_SERVER_ERROR:
        return AdapterFailure(
            FailureReason.BAD_ARTIFACT, f"vLLM rejected {adapter}: {error.message}"
        )
    if any(sign in error.message for sign in WORKER_REFUSALS):
        return AdapterFailure(
            FailureReason.BAD_ARTIFACT,
            f"vLLM refused {adapter}: {error.message.split(', please check')[0]}",
        )
    return AdapterFailure(
        FailureReason.TRANSIENT, f"vLLM failed loading {adapter} ({error.status}): {error.message}"
    )


def is_already_loaded(error: VLLMError) -> bool:
    return error.status == HTTPStatus.BAD_REQUEST and "already been loaded" in error.message


class VLLMClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def healthy(self) -> bool:
        try:
            return (await self._http.get("/health")).status_code == HTTPStatus.OK
        except httpx.HTTPError:
            return False

    async def registered_adapters(self) -> dict[str, str]:
        """Registered LoRA adapters as {name: root}; the base model cards are left out."""
        response = await self._call("GET", "/v1/models", what="listing models")
        if response.status_code != HTTPStatus.OK:
            error = VLLMError.from_response(response)
            if error.status == HTTPStatus.UNAUTHORIZED:
                raise AdapterFailure(FailureReason.CONFIGURATION, UNAUTHORIZED)
            raise AdapterFailure(
                FailureReason.TRANSIENT, f"/v1/models answered {error.status}: {error.message}"
            )
        try:
            cards = response.json()["data"]
            return {str(c["id"]): str(c.get("root")) for c in cards if c.get("parent")}
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterFailure(
                FailureReason.TRANSIENT, f"/v1/models answered an unexpected body: {exc}"
            ) from exc

    async def load(self, name: str, path: str, inplace: bool = False) -> None:
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        response = await self._call(
            "POST", "/v1/load_lora_adapter", json=body, what=f"loading {name}"
        )
        if response.status_code == HTTPStatus.OK:
            return
        error = VLLMError.from_response(response)
        if is_already_loaded(error) and not inplace:
            # Someone registered the name meanwhile: make it serve what we were asked to load.
            await self.load(name, path, inplace=True)
            return
        raise classify_load_error(error, name, path)

    async def unload(self, name: str) -> bool:
        """Unload; False when vLLM did not have it (already the desired outcome)."""
        response = await self._call(
            "POST", "/v1/unload_lora_adapter", json={"lora_name": name}, what=f"unloading {name}"
        )
        if response.status_code == HTTPStatus.OK:
            return True
        error = VLLMError.from_response(response)
        if error.status == HTTPStatus.NOT_FOUND and error.type is not None:
            return False
        raise classify_load_error(error, name, "")

    async def _call(
        self, method: str, path: str, what: str, json: dict[str, Any] | None = None
    ) -> httpx.Response:
        try:
            return await self._http.request(method, path, json=json)
        except httpx.TimeoutException as exc:
            raise AdapterFailure(
                FailureReason.TRANSIENT, f"vLLM at {self.base_url} timed out {what}"
            ) from exc
        except httpx.HTTPError as exc:
            raise AdapterFailure(
                FailureReason.TRANSIENT,
                f"vLLM at {self.base_url} unreachable while {what}: {type(exc).__name__}",
            ) from exc
