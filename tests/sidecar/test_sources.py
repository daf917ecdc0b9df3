"""Each accepted `source` form parses to one canonical value; any other is named and refused."""

from __future__ import annotations

import pytest

from sidecar.sources import (
    ACCEPTED_FORMS,
    HuggingFaceSource,
    LocalSource,
    Source,
    SourceError,
    parse_source,
)

SHA = "0123456789abcdef0123456789abcdef01234567"

ACCEPTED = [
    ("Kawon/llama3.1-food-finetune_v14_r8",
     HuggingFaceSource("Kawon/llama3.1-food-finetune_v14_r8")),
    ("nicoboss/Qwen3-32B-Uncensored", HuggingFaceSource("nicoboss/Qwen3-32B-Uncensored")),
    ("hf://org/repo", HuggingFaceSource("org/repo")),
    ("hf://org/repo/", HuggingFaceSource("org/repo")),
    ("HF://org/repo", HuggingFaceSource("org/repo")),
    ("hf://org/repo@v1.0", HuggingFaceSource("org/repo", revision="v1.0")),
    (f"hf://org/repo@{SHA}", HuggingFaceSource("org/repo", revision=SHA)),
    ("hf://org/repo@refs%2Fpr%2F3", HuggingFaceSource("org/repo", revision="refs/pr/3")),
    ("hf://org/repo/checkpoint-500", HuggingFaceSource("org/repo", subfolder="checkpoint-500")),
    ("hf://org/repo@main/a/b_c.d", HuggingFaceSource("org/repo", "main", "a/b_c.d")),
    ("/adapters/food", LocalSource("/adapters/food")),
    ("/adapters//food/./v2/../v1/", LocalSource("/adapters/food/v1")),
    ("//adapters/food", LocalSource("/adapters/food")),
    ("file:///adapters/food", LocalSource("/adapters/food")),
    ("file://localhost/adapters/food", LocalSource("/adapters/food")),
    ("file:///adapters/with%20space", LocalSource("/adapters/with space")),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), ACCEPTED)
def test_accepted_form_parses(text: str, expected: Source) -> None:
    assert parse_source(text) == expected


@pytest.mark.parametrize(("text", "_expected"), ACCEPTED)
def test_key_parses_back_to_the_same_source(text: str, _expected: Source) -> None:
    source = parse_source(text)
    assert parse_source(source.key()) == source


@pytest.mark.parametrize(
    ("source", "key"),
    [
        (HuggingFaceSource("org/repo"), "hf://org/repo"),
        (HuggingFaceSource("org/repo", "v1", "sub/dir"), "hf://org/repo@v1/sub/dir"),
        (HuggingFaceSource("org/repo", "refs/pr/3"), "hf://org/repo@refs%2Fpr%2F3"),
        (LocalSource("/adapters/food"), "file:///adapters/food"),
        (LocalSource("/adapters/with space"), "file:///adapters/with%20space"),
    ],
)
def test_key_is_canonical(source: Source, key: str) -> None:
    assert source.key() == key


def test_spellings_of_one_request_share_a_key() -> None:
    assert parse_source("org/repo").key() == parse_source("hf://org/repo/").key()
    assert parse_source("/a/b/").key() == parse_source("file:///a/./b").key()
    assert parse_source("org/repo").key() != parse_source("org/repo", revision="main").key()


def test_revision_key_applies_to_hub_sources() -> None:
    assert parse_source("org/repo", revision=SHA) == HuggingFaceSource("org/repo", revision=SHA)
    assert parse_source("hf://org/repo/sub", revision="v2") == HuggingFaceSource(
        "org/repo", "v2", "sub"
    )


def test_revision_key_may_repeat_the_url_revision() -> None:
    assert parse_source("hf://org/repo@v2", revision="v2") == HuggingFaceSource("org/repo", "v2")


REJECTED = [
    ("", "the source is empty"),
    ("x", "a Hugging Face repo id has the form 'org/repo'"),
    ("./x", "relative paths are not accepted"),
    ("../x", "relative paths are not accepted"),
    ("a/b/c", "exactly two parts"),
    ("org/re po", "'re po' is not valid in a Hugging Face repo id"),
    ("org/-repo", "'-repo' is not valid"),
    ("org/repo.", "'repo.' is not valid"),
    ("org/re--po", "'re--po' is not valid"),
    ("org/re..po", "'re..po' is not valid"),
    ("or$g/repo", "'or$g' is not valid"),
    ("org/repo@v1", "'repo@v1' is not valid"),
    ("org/" + "r" * 97, "is not valid in a Hugging Face repo id"),
    ("hf://", "an hf:// source needs a repo id"),
    ("hf://org", "an hf:// source needs a repo id"),
    ("hf://org/repo@", "revision '' is not a valid"),
    ("hf://org/repo@a..b", "revision 'a..b' is not a valid"),
    ("hf://org/repo@-x", "revision '-x' is not a valid"),
    ("hf://org/repo@x%2F", "must not end with '/'"),
    ("hf://org/repo/../other", "'..' is not allowed in a subfolder"),
    ("hf://org/repo/a/./b", "'.' is not allowed in a subfolder"),
    ("hf://org/repo/a//b", "subfolder part '' is not accepted"),
    ("hf://org/repo/a*", "subfolder part 'a*' is not accepted"),
    ("s3://bucket/adapter", "s3:// sources are not supported yet"),
    ("gs://bucket/adapter", "gs:// sources are not supported yet"),
    ("https://huggingface.co/org/repo", "https:// sources are not supported yet"),
    ("file://server/share", "a file:// URL needs an absolute path and no host"),
    ("file://", "a file:// URL needs an absolute path"),
    ("/adapters/a\0b", "NUL character"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "problem"), REJECTED)
def test_rejected_form_names_the_value_and_the_accepted_forms(text: str, problem: str) -> None:
    with pytest.raises(SourceError) as caught:
        parse_source(text)
    message = str(caught.value)
    assert f"source {text!r}" in message
    assert problem in message
    assert message.endswith(ACCEPTED_FORMS)


@pytest.mark.parametrize(
    ("text", "revision", "problem"),
    [
        ("hf://org/repo@v1", "v2", "the entry's revision 'v2' conflicts with @v1"),
        ("/adapters/food", "v1", "only Hugging Face sources have one"),
        ("file:///adapters/food", SHA, "only Hugging Face sources have one"),
        ("org/repo", "", "revision '' is not a valid"),
        ("org/repo", "a b", "revision 'a b' is not a valid"),
    ],
)
def test_rejected_revision_key(text: str, revision: str, problem: str) -> None:
    with pytest.raises(SourceError, match="accepted forms") as caught:
        parse_source(text, revision=revision)
    assert f"source {text!r}" in str(caught.value)
    assert problem in str(caught.value)
