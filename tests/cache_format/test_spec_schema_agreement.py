"""SPEC §2's presence tables, manifest.schema.json and the reference reader say the same about every field.

Each table row of SPEC.md names fields and a presence: ``REQUIRED``, ``REQUIRED for `kind`, ...``
or ``OPTIONAL`` (``shard_encoding.*`` rows follow ``identity.encoding.*``). For a manifest of
each kind, written by kdpipe's writer:

- a REQUIRED field is written, and deleting it or setting it to null makes both the schema and
  ``validate_manifest`` refuse the manifest (a field of ``identity.encoding`` is edited in
  ``shard_encoding`` too, which repeats it);
- deleting an OPTIONAL field is accepted by both;
- and the other way round: deleting any field the manifest holds is refused by the schema or the
  reader only when the SPEC says REQUIRED for that kind.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import cache_format
from cache_format import CacheWriter
from cache_format.errors import CacheError
from cache_format.manifest import validate_manifest
from helpers import cache as toy

HERE = Path(cache_format.__file__).parent
SPEC = (HERE / "SPEC.md").read_text()
SCHEMA = json.loads((HERE / "manifest.schema.json").read_text())
KINDS = ("topk", "sampled", "class_logits")
_ROW = re.compile(r"^\| ((?:`[^`|]+`(?:, )?)+) \| (REQUIRED(?: for ((?:`[a-z_]+`(?:, )?)+))?|OPTIONAL|as `([^`]+)`) \|")
# Lines that may say REQUIRED outside a table row: the RFC 2119 line and the one explaining the presence column.
_PROSE_OK = ("RFC 2119", "REQUIRED: a reader MUST refuse", '"REQUIRED for"')


def presence_table() -> dict[str, tuple[str, ...] | None]:
    """Field path -> kinds it is REQUIRED for (all kinds: ``KINDS``), or None when OPTIONAL."""
    table: dict[str, tuple[str, ...] | None] = {}
    aliases: list[tuple[str, str]] = []
    for line in SPEC.splitlines():
        m = _ROW.match(line)
        if m is None:
            if "REQUIRED" in line:  # a presence rule in prose would escape this test: keep them in tables
                assert any(ok in line for ok in _PROSE_OK), f"SPEC states REQUIRED outside a presence table: {line}"
            continue
        paths = re.findall(r"`([^`]+)`", m.group(1))
        if m.group(4):  # "as `identity.encoding.*`"
            aliases += [(p.removesuffix("*"), m.group(4).removesuffix("*")) for p in paths]
            continue
        kinds = tuple(re.findall(r"`([a-z_]+)`", m.group(3))) if m.group(3) else KINDS
        for p in paths:
            assert p not in table, f"SPEC gives {p} two presence rows"
            table[p] = kinds if m.group(2).startswith("REQUIRED") else None
    for alias, target in aliases:
        table.update({alias + p[len(target):]: v for p, v in list(table.items()) if p.startswith(target)})
    return table


def _parent(m: dict[str, Any], path: str) -> tuple[Any, str]:
    obj: Any = m
    *head, last = path.split(".")
    for part in head:
        obj = obj[part[:-2]][0] if part.endswith("[]") else obj[part]
    return obj, last


def _has(m: dict[str, Any], path: str) -> bool:
    try:
        obj, last = _parent(m, path)
    except (KeyError, IndexError, TypeError):
        return False
    return isinstance(obj, dict) and last in obj


def _paths(obj: Any, prefix: str = "") -> list[str]:
    """Every member path of a manifest; the members of the first shard stand for all (``shards[].name``)."""
    out: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            path = f"{prefix}{key}"
            out.append(path)
            if isinstance(value, list) and value and isinstance(value[0], dict):
                out += _paths(value[0], f"{path}[].")
            else:
                out += _paths(value, f"{path}.")
    return out


def _twin(path: str) -> str | None:
    """``shard_encoding`` repeats ``identity.encoding`` with the same values: a field of one is edited in both."""
    for a, b in (("identity.encoding.", "shard_encoding."), ("shard_encoding.", "identity.encoding.")):
        if path.startswith(a):
            return b + path[len(a):]
    return None


def _edited(m: dict[str, Any], path: str, delete: bool) -> dict[str, Any]:
    out = copy.deepcopy(m)
    twin = _twin(path)
    for p in (path, twin) if twin and _has(m, twin) else (path,):
        obj, last = _parent(out, p)
        if delete:
            del obj[last]
        else:
            obj[last] = None
    return out


def _refusals(m: dict[str, Any]) -> tuple[bool, bool]:
    """(schema refuses, reader refuses) the manifest ``m``."""
    schema = not jsonschema.Draft202012Validator(SCHEMA).is_valid(m)
    try:
        validate_manifest(m, "m")
        reader = False
    except CacheError:
        reader = True
    return schema, reader


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One manifest per kind, as kdpipe's writer writes it."""
    base = tmp_path_factory.mktemp("m")
    made = {"topk": (toy.identity(), toy.topk_batch(["a"])),
            "sampled": (toy.make_sampled_identity(), toy.sampled_batch(["a"])),
            "class_logits": (toy.make_class_identity(), toy.class_batch(["a"]))}
    out = {}
    for kind, (ident, batch) in made.items():
        with CacheWriter(base / kind, ident) as w:
            w.write(batch)
            out[kind] = w.finalize()
    return out


def test_the_spec_tables_cover_the_manifest() -> None:
    table = presence_table()
    for must in ("format", "identity.encoding.temperature", "shard_encoding.id_bytes", "shard_encoding.temperature",
                 "identity.tokenizer.vocab_size", "identity_fingerprint", "shards[].sha256", "totals.bytes"):
        assert must in table, f"SPEC §2 has no presence row for {must}"
    assert table["identity.tokenizer.vocab_size"] == ("topk", "sampled")
    assert table["identity_fingerprint"] is None


@pytest.mark.parametrize("kind", KINDS)
def test_required_fields_are_written_and_enforced(kind: str, manifests: dict[str, dict[str, Any]]) -> None:
    m = manifests[kind]
    assert _refusals(m) == (False, False)
    for path, kinds in presence_table().items():
        if kinds is None or kind not in kinds:
            continue
        assert _has(m, path), f"{kind}: SPEC says {path} is REQUIRED, but the writer did not write it"
        for delete in (True, False):
            got = _refusals(_edited(m, path, delete))
            assert got == (True, True), (f"{kind}: {path} {'deleted' if delete else 'null'}: SPEC says REQUIRED, "
                                         f"but (schema, reader) refuse = {got}")


@pytest.mark.parametrize("kind", KINDS)
def test_optional_fields_may_be_absent(kind: str, manifests: dict[str, dict[str, Any]]) -> None:
    m = manifests[kind]
    for path, kinds in presence_table().items():
        if (kinds is None or kind not in kinds) and _has(m, path):
            got = _refusals(_edited(m, path, True))
            assert got == (False, False), f"{kind}: {path} deleted: not REQUIRED in SPEC, but (schema, reader) refuse = {got}"


@pytest.mark.parametrize("kind", KINDS)
def test_what_the_schema_and_reader_require_the_spec_says(kind: str, manifests: dict[str, dict[str, Any]]) -> None:
    m = manifests[kind]
    table = presence_table()
    for path in _paths(m):
        got = _refusals(_edited(m, path, True))
        if any(got):
            kinds = table.get(path)
            assert kinds is not None and kind in kinds, (
                f"{kind}: deleting {path} is refused (schema, reader) = {got}, but SPEC §2 does not say REQUIRED")
