"""Enough of `kustomize build` to render this repository's kustomizations without kustomize.

Implemented: `resources` (files, and directories holding a kustomization.yaml), `components`
(directories holding a Component), and `patches` given as a file holding a strategic merge
patch, with an optional target by kind, name and equality label selector. Kustomize's load
restriction is kept: a file must lie in or below its kustomization's directory.

Everything else raises Unsupported: another kustomization field, an inline or JSON 6902
patch, a target by group, version, namespace or annotations, a `$patch` directive, a list
whose merge key is not in MERGE_KEYS. A kustomization this module cannot render exactly
fails the tests rather than being rendered half right.

One deliberate difference: a patch that matches no object is an error (kustomize ignores
it); in this repository that is always a mistake.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
KINDS = {
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Component": "kustomize.config.k8s.io/v1alpha1",
}
FIELDS = {"apiVersion", "kind", "resources", "components", "patches"}
PATCH_FIELDS = {"path", "target"}
TARGET_FIELDS = {"kind", "name", "labelSelector"}
# Strategic merge keys of the lists our patches touch (from the Kubernetes API's
# patchMergeKey markers). A list field absent from both tables is refused.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
}
ATOMIC_LISTS = {"args", "command"}

Object = dict[str, Any]


class Unsupported(Exception):
    """The kustomization uses something this renderer does not implement, or is invalid."""


@dataclass(frozen=True)
class Rendered:
    objects: list[Object]
    files: frozenset[Path]
    """Every file read: kustomizations, resources, patches."""


def render(directory: Path) -> Rendered:
    """The objects `kustomize build directory` would print, in the order they accumulate
    (kustomize sorts its output by kind; nothing here depends on order)."""
    files: set[Path] = set()
    objects = _build(directory.resolve(), "Kustomization", files)
    return Rendered(objects, frozenset(files))


def object_id(obj: Object) -> tuple[str, str, str, str]:
    metadata = obj.get("metadata") or {}
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    return (
        group,
        str(obj.get("kind")),
        str(metadata.get("namespace", "")),
        str(metadata.get("name")),
    )


def _build(
    directory: Path, expected_kind: str, files: set[Path], base: list[Object] | None = None
) -> list[Object]:
    """A Kustomization starts from nothing; a Component from the objects accumulated by the
    kustomization that uses it, which its resources join and its patches edit."""
    path = directory / KUSTOMIZATION
    if not path.is_file():
        raise Unsupported(f"{directory}: no {KUSTOMIZATION}")
    files.add(path)
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - FIELDS
    if unknown:
        raise Unsupported(f"{path}: fields not implemented here: {sorted(unknown)}")
    kind = spec.get("kind", "Kustomization")
    if kind != expected_kind:
        raise Unsupported(f"{path}: is a {kind}, expected a {expected_kind} here")
    if spec.get("apiVersion") != KINDS[kind]:
        raise Unsupported(f"{path}: apiVersion of a {kind} is {KINDS[kind]}")
    objects = list(base or [])
    for entry in spec.get("resources") or []:
        target = (directory / entry).resolve()
        if target.is_dir():
            _add(objects, _build(target, "Kustomization", files), path)
        else:
            _add(objects, _documents(_file(directory, entry, path, files)), path)
    for entry in spec.get("components") or []:
        component = (directory / entry).resolve()
        if not component.is_dir():
            raise Unsupported(f"{path}: component {entry} is not a directory")
        objects = _build(component, "Component", files, objects)
    for patch in spec.get("patches") or []:
        _patch(objects, patch, directory, path, files)
    return objects


def _file(directory: Path, entry: str, kustomization: Path, files: set[Path]) -> Path:
    target = (directory / entry).resolve()
    if not target.is_relative_to(directory):
        raise Unsupported(f"{kustomization}: {entry} is outside the kustomization's directory")
    if not target.is_file():
        raise Unsupported(f"{kustomization}: {entry} does not exist")
    files.add(target)
    return target


def _documents(path: Path) -> list[Object]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for document in documents:
        if not isinstance(document, dict) or "kind" not in document:
            raise Unsupported(f"{path}: every document must be a Kubernetes object")
    return documents


def _add(objects: list[Object], new: list[Object], where: Path) -> None:
    ids = {object_id(obj) for obj in objects}
    for obj in new:
        if object_id(obj) in ids:
            raise Unsupported(f"{where}: {object_id(obj)} is defined twice")
        ids.add(object_id(obj))
        objects.append(copy.deepcopy(obj))


def _patch(
    objects: list[Object], patch: Any, directory: Path, kustomization: Path, files: set[Path]
) -> None:
    if not isinstance(patch, dict) or set(patch) - PATCH_FIELDS or "path" not in patch:
        raise Unsupported(f"{kustomization}: only `patches: [{{path, target}}]` is implemented")
    patch_path = _file(directory, patch["path"], kustomization, files)
    [body] = _documents(patch_path)
    target = patch.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
    if set(target) - TARGET_FIELDS:
        raise Unsupported(f"{kustomization}: targets by {sorted(set(target) - TARGET_FIELDS)}")
    matched = [obj for obj in objects if _matches(obj, target, kustomization)]
    if not matched:
        raise Unsupported(f"{kustomization}: patch {patch['path']} matches no object")
    for obj in matched:
        merged = strategic_merge(obj, {k: v for k, v in body.items() if k != "metadata"})
        obj.clear()
        obj.update(merged)


def _matches(obj: Object, target: dict[str, str], kustomization: Path) -> bool:
    metadata = obj.get("metadata") or {}
    if "kind" in target and obj.get("kind") != target["kind"]:
        return False
    if "name" in target and metadata.get("name") != target["name"]:
        return False
    labels = metadata.get("labels") or {}
    for term in filter(None, str(target.get("labelSelector", "")).split(",")):
        key, equals, value = term.partition("=")
        if not equals or value.startswith("=") or key.endswith("!"):
            raise Unsupported(f"{kustomization}: label selector {term!r}: only key=value")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


def strategic_merge(original: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes' strategic merge, for maps, lists with a merge key, and atomic lists."""
    if isinstance(patch, dict):
        if any(str(key).startswith("$") for key in patch):
            raise Unsupported(f"{field}: $-directives are not implemented")
        merged = dict(original) if isinstance(original, dict) else {}
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(merged.get(key), value, key)
        return merged
    if isinstance(patch, list):
        if field in ATOMIC_LISTS:
            return copy.deepcopy(patch)
        if field not in MERGE_KEYS:
            raise Unsupported(f"list field {field!r}: merge key unknown here")
        key = MERGE_KEYS[field]
        merged_list = [copy.deepcopy(item) for item in original or []]
        for item in patch:
            index = next(
                (i for i, old in enumerate(merged_list) if old.get(key) == item[key]), None
            )
            if index is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[index] = strategic_merge(merged_list[index], item, field)
        return merged_list
    return copy.deepcopy(patch)
