"""Updating a directory exactly the way the kubelet updates a mounted ConfigMap volume.

Mirrors `AtomicWriter.Write` (kubernetes pkg/volume/util/atomic_writer.go), step for step:

1. keys must be plain file names: no `/`, no leading `..` (ConfigMap keys cannot hold `/`);
2. the current timestamped directory is read from the `..data` symlink;
3. files of the old version absent from the new payload are noted for removal;
4. when the content is unchanged and nothing is to be removed, steps 5-9 and 12 are skipped;
5. a new timestamped directory `..YYYY_MM_DD_HH_MM_SS.<random digits>` is made (0755);
6. the payload is written into it (mode 0644, the ConfigMap volume default);
7. (ownership settings: nothing to do here)
8. a `..data_tmp` symlink to it is created;
9. `..data_tmp` is renamed over `..data` — the one atomic switch readers can see;
10. missing user-visible symlinks `<key> -> ..data/<key>` are created;
11. user-visible symlinks of removed keys are deleted;
12. the old timestamped directory is removed.

So a reader that resolves `<dir>/<key>` sees either the whole old or the whole new
version, and the file the path resolves to is never modified in place.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

DATA_DIR = "..data"
DATA_DIR_TMP = "..data_tmp"
TIMESTAMP_FORMAT = "..%Y_%m_%d_%H_%M_%S."
FILE_MODE = 0o644
DIR_MODE = 0o755


def write_configmap_dir(directory: Path, files: dict[str, str]) -> None:
    for key in files:
        _check_key(key)
    directory.mkdir(parents=True, exist_ok=True)
    data_link = directory / DATA_DIR
    old_dir = directory / os.readlink(data_link) if data_link.is_symlink() else None
    removed = sorted(set(os.listdir(old_dir)) - files.keys()) if old_dir else []
    changed = old_dir is None or bool(removed) or not _holds(old_dir, files)
    if changed:
        _publish_new_version(directory, files)
    for key in files:
        if not os.path.lexists(directory / key):
            os.symlink(f"{DATA_DIR}/{key}", directory / key)
    for key in removed:
        os.remove(directory / key)
    if changed and old_dir:
        shutil.rmtree(old_dir)


def _publish_new_version(directory: Path, files: dict[str, str]) -> None:
    new_dir = _new_timestamp_dir(directory)
    for key, text in files.items():
        (new_dir / key).write_bytes(text.encode())
        (new_dir / key).chmod(FILE_MODE)
    os.symlink(new_dir.name, directory / DATA_DIR_TMP)
    os.rename(directory / DATA_DIR_TMP, directory / DATA_DIR)


def _check_key(key: str) -> None:
    if not key or "/" in key or key.startswith(".."):
        raise ValueError(f"not a ConfigMap volume file name: {key!r}")


def _holds(old_dir: Path, files: dict[str, str]) -> bool:
    return all(
        (old_dir / key).is_file() and (old_dir / key).read_bytes() == text.encode()
        for key, text in files.items()
    )


def _new_timestamp_dir(directory: Path) -> Path:
    # Go's os.MkdirTemp: the pattern plus a random decimal uint32, created 0700, then the
    # kubelet chmods it to 0755.
    prefix = time.strftime(TIMESTAMP_FORMAT, time.gmtime())
    while True:
        candidate = directory / f"{prefix}{random.getrandbits(32)}"
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:
            continue
        candidate.chmod(DIR_MODE)
        return candidate
