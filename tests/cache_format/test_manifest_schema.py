"""manifest.schema.json and the library's own validator agree on good and bad manifests."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import cache_format
from cache_format import CacheWriter, open_cache
from cache_format.errors import ManifestError
from cache_format.manifest import MANIFEST_NAME, validate_manifest
from helpers.bad_caches import CASES
from helpers.cache import make_class_identity, make_sampled_identity, write_topk_cache

SCHEMA = json.loads((Path(cache_format.__file__).parent / "manifest.schema.json").read_text())


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    from helpers.cache import class_batch, sampled_batch

    base = tmp_path_factory.mktemp("m")
    out = {"topk": json.loads((write_topk_cache(base / "t") / MANIFEST_NAME).read_text())}
    with CacheWriter(base / "s", make_sampled_identity()) as w:
        w.write(sampled_batch(["a"]))
        out["sampled"] = w.finalize()
    with CacheWriter(base / "k", make_class_identity()) as w:
        w.write(class_batch(["a"]))
        out["class_logits"] = w.finalize()
    return out


def test_written_manifests_validate(manifests: dict[str, dict[str, Any]]) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    for m in manifests.values():
        jsonschema.validate(m, SCHEMA)
        validate_manifest(m, "m")


def _mutations() -> dict[str, Any]:
    def set_(path: list[Any], value: Any) -> Any:
        def f(m: dict[str, Any]) -> None:
            obj = m
            for p in path[:-1]:
                obj = obj[p]
            obj[path[-1]] = value
        return f

    def drop(path: list[Any]) -> Any:
        def f(m: dict[str, Any]) -> None:
            obj = m
            for p in path[:-1]:
                obj = obj[p]
            del obj[path[-1]]
        return f

    return {
        "format": set_(["format"], "other"),
        "major": set_(["format_version"], "2.0"),
        "dotdot": set_(["shards", 0, "name"], "../x.arrow"),
        "absolute": set_(["shards", 0, "name"], "/x.arrow"),
        "sha": set_(["shards", 0, "sha256"], "xyz"),
        "negative_rows": set_(["shards", 0, "rows"], -1),
        "no_rows": drop(["shards", 0, "rows"]),
        "no_identity": drop(["identity"]),
        "bad_k": set_(["identity", "encoding", "k"], 0),
        "unknown_kind": set_(["identity", "encoding", "kind"], "logits"),
        "units_not_list": set_(["units"], 3),
    }


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_schema_and_validator_both_reject(name: str, manifests: dict[str, dict[str, Any]]) -> None:
    m = copy.deepcopy(manifests["topk"])
    _mutations()[name](m)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(m, SCHEMA)
    with pytest.raises(ManifestError):
        validate_manifest(m, "m")


def test_unknown_optional_fields_are_ignored(manifests: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    root = write_topk_cache(tmp_path / "c", units=1)
    m = json.loads((root / MANIFEST_NAME).read_text())
    m["format_version"] = "1.7"  # a later minor version
    m["future_field"] = {"anything": [1, 2]}
    m["shards"][0]["future_stat"] = 3
    jsonschema.validate(m, SCHEMA)
    (root / MANIFEST_NAME).write_text(json.dumps(m))
    assert len(list(open_cache(root).iter_rows())) == 4
    assert "truncated_shard" in CASES  # the corpus covers what the schema cannot (file contents)
