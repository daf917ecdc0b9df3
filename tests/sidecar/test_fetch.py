"""Fetching adapters: local directories in place, hub repositories through the real hub client.

Nothing here reaches the Hugging Face hub. Offline tests prepare a cache in the
hub's on-disk layout (refs/, snapshots/ linking into blobs/) and set
HF_HUB_OFFLINE=1. Online tests point HF_ENDPOINT at a small fake hub on
127.0.0.1 that speaks the few routes `snapshot_download` uses, so the real
client code (resolution, allow_patterns, downloads, error mapping) runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from sidecar.failures import AdapterFailure, FailureReason
from sidecar.fetch import STAGING_PREFIX, AdapterFetcher
from sidecar.sources import HuggingFaceSource, LocalSource, Source
from simulator.adapter_files import write_adapter
from tests.support.hub_cache import cache_snapshot

SHA_A = "a" * 40
SHA_B = "b" * 40
REPO = "org/food-lora"
ADAPTER_FILE_NAMES = ["adapter_config.json", "adapter_model.safetensors"]
UNRELATED_FILES = {
    "README.md": b"# food adapter\n",
    "tokenizer.json": b"{}",
    "pytorch_model.bin": bytes(1 << 20),
}
TOKEN = "hf_test_secret_do_not_print"

Files = dict[str, bytes]
Answer = tuple[int, dict[str, str], bytes]  # status, headers, body


def adapter_files(tmp_path: Path, prefix: str = "", rank: int = 8) -> Files:
    made = write_adapter(tmp_path / "made" / os.urandom(4).hex(), rank=rank)
    return {prefix + path.name: path.read_bytes() for path in made.iterdir()}


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


HubEnv = Callable[..., Path]


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HubEnv:
    """Set HF_* variables as a freshly started sidecar would see them; returns the cache dir.

    The download runs in a child process, which inherits them.
    """

    def apply(*, offline: bool, endpoint: str | None = None) -> Path:
        cache = tmp_path / "hub-cache"
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        # Were offline mode not honoured, this still keeps every request on this machine.
        monkeypatch.setenv("HF_ENDPOINT", endpoint or closed_port_url())
        return cache

    return apply


@pytest.fixture
def offline_cache(hub_env: HubEnv) -> Path:
    return hub_env(offline=True)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    return tmp_path / "adapters"


@pytest.fixture
def fetcher(adapter_dir: Path) -> AdapterFetcher:
    return AdapterFetcher(adapter_dir)


async def fetch_failure(fetcher: AdapterFetcher, adapter_id: str, source: Source) -> AdapterFailure:
    with pytest.raises(AdapterFailure) as caught:
        await fetcher.fetch(adapter_id, source)
    return caught.value


# Sync helpers: ruff (ASYNC240) keeps blocking file calls out of the async tests themselves.


def names(directory: Path | str) -> list[str]:
    return sorted(entry.name for entry in Path(directory).iterdir())


def regular_files(directory: Path | str) -> Files:
    """Name to content of each file that is not a symlink: copies, not links into the cache."""
    entries = Path(directory).iterdir()
    return {entry.name: entry.read_bytes() for entry in entries if not entry.is_symlink()}


def absent(path: Path) -> bool:
    return not path.exists()


def leftovers(directory: Path) -> list[str]:
    return [entry.name for entry in directory.glob(f"{STAGING_PREFIX}*")]


# Offline, from a prepared hub cache


@pytest.mark.asyncio
async def test_default_branch_resolves_through_refs_main(
    offline_cache: Path, adapter_dir: Path, fetcher: AdapterFetcher, tmp_path: Path
) -> None:
    files = adapter_files(tmp_path, rank=16)
    cache_snapshot(offline_cache, REPO, SHA_A, {**files, **UNRELATED_FILES}, refs=("main",))

    fetched = await fetcher.fetch("food", HuggingFaceSource(REPO))

    assert fetched.path == str(adapter_dir / "food" / SHA_A)
    assert (fetched.revision, fetched.owned, fetched.config.rank) == (SHA_A, True, 16)
    assert regular_files(fetched.path) == files
    assert leftovers(adapter_dir / "food") == []


@pytest.mark.asyncio
@pytest.mark.parametrize("revision", [SHA_B, "v2"])
async def test_pinned_revision_picks_its_snapshot(
    offline_cache: Path, fetcher: AdapterFetcher, tmp_path: Path, revision: str
) -> None:
    cache_snapshot(offline_cache, REPO, SHA_A, adapter_files(tmp_path, rank=8), refs=("main",))
    cache_snapshot(offline_cache, REPO, SHA_B, adapter_files(tmp_path, rank=32), refs=("v2",))

    fetched = await fetcher.fetch("food", HuggingFaceSource(REPO, revision=revision))

    assert (fetched.revision, fetched.config.rank) == (SHA_B, 32)
    assert Path(fetched.path).name == SHA_B


@pytest.mark.asyncio
async def test_subfolder_is_copied_into_the_revision_directory(
    offline_cache: Path, adapter_dir: Path, fetcher: AdapterFetcher, tmp_path: Path
) -> None:
    files = {
        **adapter_files(tmp_path, rank=8),
        **adapter_files(tmp_path, prefix="loras/food/", rank=64),
        **UNRELATED_FILES,
    }
    cache_snapshot(offline_cache, REPO, SHA_A, files, refs=("main",))

    fetched = await fetcher.fetch("food", HuggingFaceSource(REPO, subfolder="loras/food"))

    revision_dir = adapter_dir / "food" / SHA_A
    assert fetched.path == str(revision_dir / "loras" / "food")
    assert fetched.config.rank == 64
    assert names(revision_dir) == ["loras"]
    assert names(fetched.path) == ADAPTER_FILE_NAMES


@pytest.mark.asyncio
async def test_pickle_weights_are_copied_too(
    offline_cache: Path, fetcher: AdapterFetcher, tmp_path: Path
) -> None:
    files = adapter_files(tmp_path)
    files["adapter_model.bin"] = files.pop("adapter_model.safetensors")
    cache_snapshot(offline_cache, REPO, SHA_A, files, refs=("main",))

    fetched = await fetcher.fetch("food", HuggingFaceSource(REPO))

    assert regular_files(fetched.path) == files


@pytest.mark.asyncio
async def test_second_fetch_reuses_the_copy(
    offline_cache: Path, fetcher: AdapterFetcher, tmp_path: Path
) -> None:
    cache_snapshot(offline_cache, REPO, SHA_A, adapter_files(tmp_path), refs=("main",))
    first = await fetcher.fetch("food", HuggingFaceSource(REPO))
    marker = Path(first.path) / "marker"
    marker.touch()

    second = await fetcher.fetch("food", HuggingFaceSource(REPO))

    assert second == first
    assert "marker" in names(second.path)


@pytest.mark.asyncio
async def test_pinned_commit_already_copied_needs_no_hub_cache(
    offline_cache: Path, fetcher: AdapterFetcher, tmp_path: Path
) -> None:
    cache_snapshot(offline_cache, REPO, SHA_A, adapter_files(tmp_path), refs=())
    source = HuggingFaceSource(REPO, revision=SHA_A)
    first = await fetcher.fetch("food", source)
    shutil.rmtree(offline_cache)

    assert await fetcher.fetch("food", source) == first


@pytest.mark.asyncio
async def test_a_broken_copy_is_replaced(
    offline_cache: Path, adapter_dir: Path, fetcher: AdapterFetcher, tmp_path: Path
) -> None:
    cache_snapshot(offline_cache, REPO, SHA_A, adapter_files(tmp_path), refs=("main",))
    broken = adapter_dir / "food" / SHA_A
    broken.mkdir(parents=True)
    (broken / "adapter_model.safetensors").write_bytes(b"half")

    fetched = await fetcher.fetch("food", HuggingFaceSource(REPO))

    assert fetched.path == str(broken)
    assert sorted(entry.name for entry in broken.iterdir()) == ADAPTER_FILE_NAMES
    assert leftovers(adapter_dir / "food") == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "source",
    [
        HuggingFaceSource("org/not-cached"),
        HuggingFaceSource(REPO, revision=SHA_B),
        HuggingFaceSource(REPO, revision="v9"),
    ],
)
async def test_not_in_cache_while_offline_is_transient(
    offline_cache: Path, adapter_dir: Path, fetcher: AdapterFetcher, tmp_path: Path,
    source: HuggingFaceSource,
) -> None:  # fmt: skip
    # Transient, not a bad artifact: offline, nothing says the repository or revision does not
    # exist, and the cache may be filled (or the network allowed) later without any edit.
    cache_snapshot(offline_cache, REPO, SHA_A, adapter_files(tmp_path), refs=("main",))

    failure = await fetch_failure(fetcher, "food", source)

    assert failure.reason is FailureReason.TRANSIENT
    assert "'food'" in failure.message
    assert source.key() in failure.message
    assert "HF_HUB_OFFLINE" in failure.message
    assert absent(adapter_dir / "food")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"adapter_model.safetensors": b"x", **UNRELATED_FILES}, "No adapter found"),
        ({"adapter_config.json": b'{"r": 8}', "README.md": b""}, "No adapter_model.safetensors"),
        ({"adapter_config.json": b"{not json", "adapter_model.bin": b""}, "no integer 'r'"),
        ({"adapter_config.json": b'{"r": 8, "peft_type": "IA3"}', "adapter_model.bin": b""},
         "Only LoRA adapters"),
    ],
)  # fmt: skip
async def test_snapshot_that_is_not_a_lora_adapter_is_a_bad_artifact(
    offline_cache: Path, adapter_dir: Path, fetcher: AdapterFetcher, files: Files, problem: str
) -> None:
    cache_snapshot(offline_cache, REPO, SHA_A, files, refs=("main",))

    failure = await fetch_failure(fetcher, "food", HuggingFaceSource(REPO))

    assert failure.reason is FailureReason.BAD_ARTIFACT
    assert f"adapter 'food' from hf://{REPO}: " in failure.message
    assert problem in failure.message
    assert absent(adapter_dir / "food" / SHA_A)


@pytest.mark.asyncio
async def test_unsafe_adapter_id_is_an_invalid_spec(
    offline_cache: Path, adapter_dir: Path, fetcher: AdapterFetcher, tmp_path: Path
) -> None:
    cache_snapshot(offline_cache, REPO, SHA_A, adapter_files(tmp_path), refs=("main",))

    failure = await fetch_failure(fetcher, "../escape", HuggingFaceSource(REPO))

    assert failure.reason is FailureReason.INVALID_SPEC
    assert "'../escape'" in failure.message
    assert absent(adapter_dir)


@pytest.mark.asyncio
async def test_unwritable_adapter_dir_is_a_configuration_failure(
    offline_cache: Path, adapter_dir: Path, fetcher: AdapterFetcher, tmp_path: Path
) -> None:
    cache_snapshot(offline_cache, REPO, SHA_A, adapter_files(tmp_path), refs=("main",))
    await asyncio.to_thread(adapter_dir.write_text, "a file, not a directory")

    failure = await fetch_failure(fetcher, "food", HuggingFaceSource(REPO))

    assert failure.reason is FailureReason.CONFIGURATION
    assert f"cannot write {adapter_dir / 'food' / SHA_A}" in failure.message


# Local directories


@pytest.mark.asyncio
async def test_local_directory_is_used_in_place(
    adapter_dir: Path, fetcher: AdapterFetcher, tmp_path: Path
) -> None:
    local = write_adapter(tmp_path / "local" / "food", rank=16)

    fetched = await fetcher.fetch("food", LocalSource(str(local)))

    assert (fetched.path, fetched.revision, fetched.owned) == (str(local), None, False)
    assert fetched.config.rank == 16
    assert absent(adapter_dir)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda directory: None, "No adapter found"),
        (lambda directory: write_adapter(directory, peft_type="IA3"), "use a LoRA adapter"),
    ],
)
async def test_unusable_local_directory_is_a_bad_artifact(
    fetcher: AdapterFetcher, tmp_path: Path, make: Callable[[Path], object], problem: str
) -> None:
    local = tmp_path / "local" / "food"
    make(local)

    failure = await fetch_failure(fetcher, "food", LocalSource(str(local)))

    assert failure.reason is FailureReason.BAD_ARTIFACT
    assert f"adapter 'food' from {local.as_uri()}: " in failure.message
    assert problem in failure.message


# release()


@pytest.mark.asyncio
async def test_release_keeps_one_revision_or_none(
    offline_cache: Path, adapter_dir: Path, fetcher: AdapterFetcher, tmp_path: Path
) -> None:
    cache_snapshot(offline_cache, REPO, SHA_A, adapter_files(tmp_path), refs=("main",))
    cache_snapshot(offline_cache, REPO, SHA_B, adapter_files(tmp_path), refs=())
    for revision in (SHA_A, SHA_B):
        await fetcher.fetch("food", HuggingFaceSource(REPO, revision=revision))
    await fetcher.fetch("other", HuggingFaceSource(REPO))
    (adapter_dir / "food" / f"{STAGING_PREFIX}crashed").mkdir()
    local = write_adapter(tmp_path / "local" / "food")
    await fetcher.fetch("food", LocalSource(str(local)))

    fetcher.release("food", keep=SHA_B)
    assert names(adapter_dir / "food") == [SHA_B]

    fetcher.release("food")
    assert absent(adapter_dir / "food")
    assert (adapter_dir / "other" / SHA_A / "adapter_config.json").is_file()
    assert (local / "adapter_config.json").is_file()


def test_release_of_an_adapter_never_fetched_does_nothing(
    adapter_dir: Path, fetcher: AdapterFetcher
) -> None:
    fetcher.release("never")
    fetcher.release("never", keep=SHA_A)
    assert not adapter_dir.exists()


@pytest.mark.parametrize("adapter_id", ["../x", "..", ".", "", "a/b", "/abs"])
def test_release_refuses_ids_outside_the_adapter_dir(
    adapter_dir: Path, fetcher: AdapterFetcher, adapter_id: str
) -> None:
    victim = adapter_dir.parent / "x"
    victim.mkdir()

    with pytest.raises(ValueError, match="cannot name a directory"):
        fetcher.release(adapter_id)

    assert victim.is_dir()


def test_release_refuses_a_revision_that_is_a_path(
    adapter_dir: Path, fetcher: AdapterFetcher
) -> None:
    (adapter_dir / "food" / SHA_A).mkdir(parents=True)

    with pytest.raises(ValueError, match="not a directory name"):
        fetcher.release("food", keep=f"../food/{SHA_A}")

    assert (adapter_dir / "food" / SHA_A).is_dir()


# Online, against a fake hub on 127.0.0.1


@dataclass
class FakeHub:
    """The routes `snapshot_download` uses: revision info, tree listing, file resolve."""

    url: str = ""
    files: dict[str, Files] = field(default_factory=dict)  # commit sha -> path -> content
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    failure: tuple[int, dict[str, str]] | None = None  # answer every request with this
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def handle(self, method: str, path: str, authorization: str | None) -> Answer:
        self.requests.append((method, path, authorization))
        if self.failure is not None:
            status, headers = self.failure
            return status, headers, b"{}"
        if match := re.fullmatch(rf"/api/models/{REPO}/revision/(.+)", path):
            return self._revision(unquote(match.group(1)))
        if match := re.fullmatch(rf"/api/models/{REPO}/tree/(\w+)", path):
            return self._tree(match.group(1))
        if match := re.fullmatch(rf"/{REPO}/resolve/(\w+)/(.+)", path):
            return self._file(match.group(1), match.group(2))
        return 401, {"X-Error-Code": "RepoNotFound"}, b"{}"

    def _revision(self, revision: str) -> Answer:
        sha = self.refs.get(revision, revision)
        if sha not in self.files:
            return 404, {"X-Error-Code": "RevisionNotFound"}, b"{}"
        return 200, {}, json.dumps({"id": REPO, "sha": sha, "private": False}).encode()

    def _tree(self, sha: str) -> Answer:
        listing = [
            {"type": "file", "path": name, "size": len(content), "oid": _git_oid(content)}
            for name, content in self.files[sha].items()
        ]
        return 200, {}, json.dumps(listing).encode()

    def _file(self, sha: str, name: str) -> Answer:
        content = self.files[sha][name]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_oid(content)}"'}
        return 200, headers, content


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@pytest.fixture
def fake_hub(hub_env: HubEnv) -> Iterator[FakeHub]:
    hub = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(send_body=True)

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def _answer(self, *, send_body: bool) -> None:
            path = urlsplit(self.path).path
            status, headers, body = hub.handle(self.command, path, self.headers["Authorization"])
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval keeps shutdown() from adding half a second to every test.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    hub_env(offline=False, endpoint=hub.url)
    yield hub
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.asyncio
async def test_online_download_requests_only_the_adapter_files(
    fake_hub: FakeHub, adapter_dir: Path, tmp_path: Path
) -> None:
    files = adapter_files(tmp_path, rank=8)
    fake_hub.files = {SHA_A: {**files, **UNRELATED_FILES}}
    fake_hub.refs = {"main": SHA_A}
    fetcher = AdapterFetcher(adapter_dir, token=TOKEN)

    fetched = await fetcher.fetch("food", HuggingFaceSource(REPO))

    assert (fetched.path, fetched.revision) == (str(adapter_dir / "food" / SHA_A), SHA_A)
    assert names(fetched.path) == ADAPTER_FILE_NAMES
    downloaded = {path.rsplit("/", 1)[1] for _, path, _ in fake_hub.requests if "/resolve/" in path}
    assert downloaded == set(ADAPTER_FILE_NAMES)
    # Only the repository's own routes matter: the hub client may also ask the hub for
    # things of its own (e.g. a registry it uses to fill its user agent), without a token.
    repository = [r for r in fake_hub.requests if f"/{REPO}/" in r[1]]
    assert repository
    assert {authorization for _, _, authorization in repository} == {f"Bearer {TOKEN}"}


HUB_FAILURES = [
    (401, {"X-Error-Code": "RepoNotFound"}, FailureReason.BAD_ARTIFACT, "no such repository"),
    (404, {"X-Error-Code": "RevisionNotFound"},
     FailureReason.BAD_ARTIFACT, "revision does not exist"),
    (403, {"X-Error-Code": "GatedRepo"}, FailureReason.CONFIGURATION, "gated"),
    (401, {"X-Error-Message": "Invalid credentials in Authorization header"},
     FailureReason.CONFIGURATION, "HTTP 401"),
    (403, {}, FailureReason.CONFIGURATION, "HTTP 403"),
    (503, {}, FailureReason.TRANSIENT, "HTTP 503"),
]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize(("status", "headers", "reason", "problem"), HUB_FAILURES)
async def test_hub_errors_are_sorted_by_what_fixes_them(
    fake_hub: FakeHub, adapter_dir: Path, status: int, headers: dict[str, str],
    reason: FailureReason, problem: str,
) -> None:  # fmt: skip
    fake_hub.failure = (status, headers)
    fetcher = AdapterFetcher(adapter_dir, token=TOKEN)

    failure = await fetch_failure(fetcher, "food", HuggingFaceSource(REPO, revision="main"))

    assert failure.reason is reason
    assert problem in failure.message
    assert f"adapter 'food' from hf://{REPO}@main: " in failure.message
    assert TOKEN not in failure.message
    if reason is FailureReason.CONFIGURATION:
        assert "HF_TOKEN" in failure.message


@pytest.mark.asyncio
async def test_unreachable_hub_is_transient(hub_env: HubEnv, fetcher: AdapterFetcher) -> None:
    hub_env(offline=False, endpoint=closed_port_url())

    failure = await fetch_failure(fetcher, "food", HuggingFaceSource(REPO))

    assert failure.reason is FailureReason.TRANSIENT
    assert "ConnectError" in failure.message
