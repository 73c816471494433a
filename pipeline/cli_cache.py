"""``kdpipe cache info|verify|merge|copy|finalize``: inspect, check, join, share and finish logit caches.

Imports nothing heavy at module import: ``cache_format`` (numpy + pyarrow) is imported
inside each command, torch never.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

cache_app = typer.Typer(name="cache", help="Inspect, verify, merge and share logit caches.", no_args_is_help=True)


def _storage_options(endpoint_url: str | None, anon: bool, extra: list[str] | None = None) -> dict[str, Any] | None:
    """fsspec options from --endpoint-url, --anon and --storage-option KEY=VALUE (as dump-teacher reads them)."""
    from pipeline.dump.config import parse_storage_options
    from pipeline.errors import ConfigError

    try:
        opts = parse_storage_options(extra or [])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if endpoint_url:
        opts["endpoint_url"] = endpoint_url
    if anon:
        opts["anon"] = True
    return opts or None


EndpointOpt = Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint (e.g. MinIO).")]
AnonOpt = Annotated[bool, typer.Option("--anon", help="Read a public bucket without credentials.")]
StorageOpt = Annotated[list[str] | None, typer.Option(
    "--storage-option", help="fsspec option KEY=VALUE (repeatable; VALUE parsed as JSON when it can be; dotted "
    "keys nest: config_kwargs.read_timeout=60).")]


def cache_summary(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``kdpipe cache info`` prints, as a dict."""
    from cache_format import open_cache

    r = open_cache(path, storage_options)
    m = r.manifest
    ident = r.identity
    return {
        "path": path,
        "format_version": m.format_version,
        "created_at": m.created_at,
        "producer": m.producer,
        "teacher": ident.teacher,
        "tokenizer": ident.tokenizer,
        "recipe": ident.recipe,
        "dataset": ident.dataset,
        "encoding": ident.encoding.to_dict(),
        "identity_fingerprint": ident.fingerprint(m.format_version),  # by the rule of the cache's version
        "rows": m.num_rows,
        "tokens": m.num_tokens,
        "positions": m.num_positions,
        "bytes": m.num_bytes,
        # A target position is a token with a stored distribution; class_logits caches have none (per row instead).
        "bytes_per_position" if m.num_positions else "bytes_per_row":
            m.num_bytes / (m.num_positions or m.num_rows) if m.num_positions or m.num_rows else None,
        "bytes_per_input_token": m.num_bytes / m.num_tokens if m.num_tokens else None,
        "shards": len(m.shards),
        "units": len(m.units),
    }


@cache_app.command("info")
def info(path: Annotated[str, typer.Argument(help="Cache directory or URL (s3://, gs://, hf://, file://).")],
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
         endpoint_url: EndpointOpt = None, anon: AnonOpt = False) -> None:
    """Teacher, tokenizer, encoding, rows, tokens, bytes per target position and per input token, and shards."""
    from cache_format.manifest import printable

    s = cache_summary(path, _storage_options(endpoint_url, anon))
    if as_json:
        typer.echo(json.dumps(s, indent=2))  # ensure_ascii: control characters come out as \u001b, never raw
        return
    t, tok, enc = s["teacher"], s["tokenizer"], s["encoding"]
    lines = [
        f"cache      {s['path']}  (format {s['format_version']}, created {s['created_at']})",
        f"teacher    {t.get('name')} @ {t.get('revision')}  dtype={t.get('dtype')} backend={t.get('backend')}",
        f"tokenizer  {tok.get('name')}  vocab_size={tok.get('vocab_size')} model_vocab_size="
        f"{tok.get('model_vocab_size')}  {str(tok.get('fingerprint'))[:23]}",
        "encoding   " + " ".join(f"{k}={v}" for k, v in enc.items()),
        f"recipe     {s['recipe'].get('task')}   dataset {s['dataset'].get('name')} {s['dataset'].get('split') or ''}",
        f"rows       {s['rows']}   tokens {s['tokens']}   target positions {s['positions']}",
        f"bytes      {s['bytes']}" + _per(s, "bytes_per_position", "per target position")
        + _per(s, "bytes_per_row", "per row") + _per(s, "bytes_per_input_token", "per input token"),
        f"shards     {s['shards']}   units {s['units']}",
    ]
    # Manifest strings come from whoever shared the cache: no escape sequence may reach the terminal.
    typer.echo("\n".join(printable(line, 1000) for line in lines))


def _per(s: dict[str, Any], key: str, label: str) -> str:
    return f"   {label} {s[key]:.2f}" if s.get(key) is not None else ""


@cache_app.command("verify")
def verify(path: Annotated[str, typer.Argument(help="Cache directory or URL.")],
           quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final line.")] = False,
           endpoint_url: EndpointOpt = None, anon: AnonOpt = False) -> None:
    """Check checksums, schema, counts and every row's invariants; exit 2 naming the first bad shard/row."""
    from cache_format import verify_cache

    report = verify_cache(path, _storage_options(endpoint_url, anon),
                          progress=None if quiet else typer.echo)
    typer.echo(f"ok: {report['shards']} shards, {report['rows']} rows, {report['positions']} target positions verified")


@cache_app.command("merge")
def merge(out: Annotated[str, typer.Argument(help="New (empty) output cache: directory or URL.")],
          inputs: Annotated[list[str], typer.Argument(help="Finished caches of one dump (identical identity).")],
          endpoint_url: EndpointOpt = None, anon: AnonOpt = False, storage_option: StorageOpt = None) -> None:
    """Join independently finished caches of one dump into one (workers sharing one --out need no merge)."""
    from cache_format import merge_caches

    m = merge_caches(out, inputs, _storage_options(endpoint_url, anon, storage_option))
    typer.echo(f"merged {len(inputs)} caches into {out}: {m['totals']['shards']} shards, {m['totals']['rows']} rows")


@cache_app.command("copy")
def copy(src: Annotated[str, typer.Argument(help="Finished cache: directory or URL.")],
         dst: Annotated[str, typer.Argument(help="Destination directory or URL (e.g. s3://bucket/prefix).")],
         overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a cache already at DST.")] = False,
         endpoint_url: EndpointOpt = None, anon: AnonOpt = False) -> None:
    """Upload a cache to an object store (or download one); shards first, manifest last, checksums checked."""
    from cache_format import copy_cache

    opts = _storage_options(endpoint_url, anon)
    m = copy_cache(src, dst, src_storage_options=opts, dst_storage_options=opts, overwrite=overwrite)
    typer.echo(f"copied {m['totals']['shards']} shards ({m['totals']['bytes']} bytes) to {dst}")


@cache_app.command("finalize")
def finalize(url: Annotated[str, typer.Argument(help="Unfinished cache written by one or many workers: directory "
                                                    "or URL.")],
             verify_sha256: Annotated[bool, typer.Option("--verify", help="Also check every shard's sha256 (reads "
                                                                          "every byte; sizes are always checked).")]
             = False,
             partial: Annotated[bool, typer.Option("--partial", help="Finalize with the units present: one worker's "
                                                   "own cache (its own --out), to `kdpipe cache merge` with the "
                                                   "others'.")] = False,
             endpoint_url: EndpointOpt = None, storage_option: StorageOpt = None) -> None:
    """Write the manifest once every unit is there (what the last dump worker does); exit 2 naming missing units."""
    from cache_format.finalize import finalize_cache

    m = finalize_cache(url, _storage_options(endpoint_url, False, storage_option), verify=verify_sha256,
                       allow_missing=partial)
    typer.echo(f"finalized {url}: {len(m['units'])} units, {m['totals']['shards']} shards, {m['totals']['rows']} rows")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `kdpipe` app."""
    app.add_typer(cache_app, name="cache")
