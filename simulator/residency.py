"""Where each registered LoRA adapter lives, modelled on vLLM's LRU adapter managers.

vLLM keeps registered adapters in a CPU cache of `--max-cpu-loras` entries
(evicted ones stay registered and are re-read from disk on next use) and at most
`--max-loras` of them in GPU slots. An adapter with requests running is pinned
in its slot; a request needing a new adapter when every slot is pinned waits.
Pure bookkeeping: no I/O, no clock, so it is tested without sockets.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict

from simulator.artifacts import AdapterArtifact


class SwapKind(enum.Enum):
    """What activating an adapter cost."""

    NONE = "none"  # already in a GPU slot
    FROM_CPU = "cpu"  # copied from the CPU cache into a slot
    FROM_DISK = "disk"  # evicted from the CPU cache earlier: re-read from disk first


class LoraResidency:
    def __init__(self, max_loras: int, max_cpu_loras: int) -> None:
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.registered: dict[str, AdapterArtifact] = {}
        self._cpu: OrderedDict[str, None] = OrderedDict()
        self._gpu: OrderedDict[str, None] = OrderedDict()
        self._active: Counter[str] = Counter()

    @property
    def cpu_resident(self) -> list[str]:
        return list(self._cpu)

    @property
    def gpu_resident(self) -> list[str]:
        return list(self._gpu)

    @property
    def active(self) -> list[str]:
        return list(self._active)

    def register(self, name: str, artifact: AdapterArtifact) -> None:
        """Register (or replace, for an in-place reload) and load into the CPU cache."""
        if name in self.registered and not self._active[name]:
            self._gpu.pop(name, None)
        self.registered[name] = artifact
        self._touch_cpu(name)

    def unregister(self, name: str) -> None:
        del self.registered[name]
        self._cpu.pop(name, None)
        if not self._active[name]:
            self._gpu.pop(name, None)

    def reset(self) -> None:
        self.registered.clear()
        self._cpu.clear()
        self._gpu.clear()
        self._active.clear()

    def can_activate(self, name: str) -> bool:
        return name in self._active or len(self._active) < self.max_loras

    def activate(self, name: str) -> SwapKind:
        """Pin `name` in a GPU slot for one more running request; caller checked can_activate."""
        self._active[name] += 1
        if name in self._gpu:
            self._gpu.move_to_end(name)
            self._touch_cpu(name)
            return SwapKind.NONE
        kind = SwapKind.FROM_CPU if name in self._cpu else SwapKind.FROM_DISK
        self._touch_cpu(name)
        if len(self._gpu) >= self.max_loras:
            victim = next(n for n in self._gpu if not self._active[n])
            del self._gpu[victim]
        self._gpu[name] = None
        return kind

    def deactivate(self, name: str) -> None:
        self._active[name] -= 1
        if self._active[name] <= 0:
            del self._active[name]
            if name not in self.registered:  # unloaded while it was serving
                self._gpu.pop(name, None)

    def _touch_cpu(self, name: str) -> None:
        self._cpu[name] = None
        self._cpu.move_to_end(name)
        while len(self._cpu) > self.max_cpu_loras:
            victim = next((n for n in self._cpu if not self._active[n] and n != name), None)
            if victim is None:
                return
            del self._cpu[victim]
            self._gpu.pop(victim, None)
