"""The demo's client: a steady multi-model workload through the gateway, every answer
recorded (when it was asked, which model, the status, which adapter answered)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx

from loractl.demo.scene import MODELS

PROMPTS = ("How was the soup?", "List the open orders.", "Sum up this thread.")


@dataclass(frozen=True)
class Answer:
    at: float  # monotonic, when the request was sent
    model: str
    status: int  # 0: no answer at all (connection failed, timed out)
    served_by: str  # the `model` of a 200 answer: the adapter the picker chose


@dataclass
class Workload:
    url: str
    clients: int = 6
    max_tokens: int = 8
    seed: int = 0
    answers: list[Answer] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=10.0) as client:
            await asyncio.gather(
                *(
                    self._client(client, stop, random.Random(self.seed + n))
                    for n in range(self.clients)
                )
            )

    async def _client(
        self, client: httpx.AsyncClient, stop: asyncio.Event, rng: random.Random
    ) -> None:
        names = list(MODELS)
        shares = [share for _, share in MODELS.values()]
        while not stop.is_set():
            model = rng.choices(names, shares)[0]
            body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": self.max_tokens}
            sent = time.monotonic()
            try:
                response = await client.post("/v1/completions", json=body)
            except httpx.HTTPError:
                self.answers.append(Answer(sent, model, 0, ""))
                await asyncio.sleep(0.1)  # a gateway that is down must not be hammered
                continue
            served_by = ""
            if response.status_code == 200:
                served_by = str(response.json().get("model", ""))
            self.answers.append(Answer(sent, model, response.status_code, served_by))
