"""The token cache: each split tokenized once, into memory-mapped arrays every rank reads.

Layout of `data.cache_dir` (default: `token_cache` next to the reference cache):

  {split}/manifest.json            format_version, fingerprint (+ its parts), chunks, counts, complete
  {split}/part-{k:06d}.{index,offsets,starts,ids}.npy
                                   rows [k·C, (k+1)·C) of the split's row stream (C = data.chunk_rows),
                                   tokenized (see tokenize.TokenizedPairs); .json beside: its counts

Rank r tokenizes chunks k with k % world == r, so each row is tokenized once in total, and every
rank does an equal share (no rank waits long at the barrier after). A part's .json is written last
and marks it complete; an interrupted build resumes from the complete parts. The fingerprint covers
the data files' bytes, the tokenizer and every token-changing setting; a cache built from anything
else is rebuilt, saying which part changed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dpo_dist import collectives, fingerprint, ownership
from dpo_dist.config import Config, DataConfig
from dpo_dist.data.rows import detect_form, rename_columns
from dpo_dist.data.sources import Chunk, Source, resolve_sources
from dpo_dist.data.store import Pairs, PreferenceData
from dpo_dist.data.tokenize import TokenizedPairs, TokenSettings, tokenize_rows
from dpo_dist.errors import UserError, set_stage

FORMAT_VERSION = 1


def numbered_chunks(sources: list[Source], chunk_rows: int) -> Iterator[tuple[int, int, Chunk]]:
    """(chunk number, row number of its first row, chunk) over all sources in order."""
    k = first = 0
    for source in sources:
        for chunk in source.chunks(chunk_rows):
            yield k, first, chunk
            k, first = k + 1, first + chunk.num_rows


def token_settings(sources: list[Source], data: DataConfig, what: str) -> TokenSettings:
    """The settings of a split, its form and layout read from its first row."""
    first = next((chunk.load()[0] for source in sources for chunk in source.chunks(1)), None)
    if first is None:
        raise UserError(f"{what}: {', '.join(s.name for s in sources)} holds no rows")
    where, row = first
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    absent = {ours: theirs for ours, theirs in data.columns.items() if theirs not in row}
    if absent:
        ours, theirs = next(iter(absent.items()))
        raise UserError(f"data.columns maps {ours} to '{theirs}', but {where} has no field '{theirs}' (its fields: "
                        f"{', '.join(map(str, row))})")
    row = rename_columns(row, data.columns)
    form = detect_form(row)
    return TokenSettings(max_length=data.max_length, truncation=data.truncation, form=form,
                         implicit_prompt=form != "pretokenized" and "prompt" not in row,
                         columns=dict(data.columns), chat_template_kwargs=dict(data.chat_template_kwargs))


def load_preference_data(spec, tokenizer, max_length: int, truncation: str, what: str = "data",
                         **options) -> PreferenceData:
    """Reads and tokenizes a whole split in this process, in memory (no cache): for tests, tools and
    benchmarks. `options`: other `data.*` keys (columns, chat_template_kwargs, chunk_rows)."""
    data = DataConfig(train=spec, max_length=max_length, truncation=truncation, **options)
    sources = resolve_sources(spec, what)
    settings = token_settings(sources, data, what)
    parts = [tokenize_rows(chunk.load(), first, tokenizer, settings)
             for _, first, chunk in numbered_chunks(sources, data.chunk_rows)]
    return _split(parts, settings.form, sources, what, data.max_length)


def _split(parts: list[TokenizedPairs], form: str, sources: list[Source], what: str, max_length: int):
    pairs = Pairs(parts)
    if not len(pairs):
        raise UserError(f"{what}: every row was dropped by data.max_length={max_length}; raise it")
    return PreferenceData(pairs, form, [f for s in sources for f in s.files()], sum(p.rows for p in parts),
                          sum(p.truncated for p in parts), sum(p.dropped for p in parts))


def fingerprint_parts(sources: list[Source], tokenizer, settings: TokenSettings, chunk_rows: int) -> dict[str, str]:
    """Data bytes, tokenizer, and each setting on its own, so that a mismatch names the setting."""
    settings_by_key = {f"data.{key}": json.dumps(value, sort_keys=True)
                       for key, value in {**vars(settings), "chunk_rows": chunk_rows}.items()}
    return {
        "data files": fingerprint.digest_of_files([f for s in sources for f in s.files()]),
        "tokenizer": fingerprint.tokenizer_digest(tokenizer),
        **settings_by_key,
    }


def _part_path(folder: Path, k: int, suffix: str) -> Path:
    return folder / f"part-{k:06d}.{suffix}"


def _write_part(folder: Path, k: int, pairs: TokenizedPairs) -> None:
    for name in TokenizedPairs.ARRAYS:
        path = _part_path(folder, k, f"{name}.npy")
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with tmp.open("wb") as f:
            np.save(f, getattr(pairs, name))
        os.replace(tmp, path)
    counts = {"pairs": len(pairs.index), "rows": pairs.rows, "truncated": pairs.truncated, "dropped": pairs.dropped}
    fingerprint.write_json_atomic(_part_path(folder, k, "json"), counts)  # last: the part is complete


def _read_part(folder: Path, k: int) -> TokenizedPairs:
    counts = json.loads(_part_path(folder, k, "json").read_text())
    if counts["pairs"] == 0:  # numpy cannot memory-map an empty array
        arrays = {name: np.zeros(1 if name == "offsets" else 0, dtype=np.int64) for name in TokenizedPairs.ARRAYS}
    else:
        arrays = {name: np.load(_part_path(folder, k, f"{name}.npy"), mmap_mode="r") for name in TokenizedPairs.ARRAYS}
    return TokenizedPairs(**arrays, **{key: counts[key] for key in ("rows", "truncated", "dropped")})


def _build(folder: Path, sources: list[Source], tokenizer, settings: TokenSettings, chunk_rows: int,
           parts: dict[str, str], accelerator, what: str) -> None:
    """Tokenizes this rank's chunks that are not complete yet; the main process then seals the manifest."""
    world, rank = accelerator.num_processes, accelerator.process_index
    set_stage(f"tokenization of {what}", lambda: f"the complete parts of the token cache {folder}; rerun the same "
              "command to continue from them")
    chunks, start = 0, time.perf_counter()
    with tqdm(desc=f"tokenizing {what}", unit="row", disable=not accelerator.is_local_main_process) as bar:
        for k, first, chunk in numbered_chunks(sources, chunk_rows):
            chunks = k + 1
            if k % world == rank and not _part_path(folder, k, "json").is_file():
                _write_part(folder, k, tokenize_rows(chunk.load(), first, tokenizer, settings))
                bar.update(chunk.num_rows * world)  # the other ranks do as much meanwhile
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        counts = [json.loads(_part_path(folder, k, "json").read_text()) for k in range(chunks)]
        totals = {key: sum(c[key] for c in counts) for key in ("pairs", "rows", "truncated", "dropped")}
        fingerprint.write_json_atomic(folder / "manifest.json", _manifest(parts, settings, chunks, totals, True))
        seconds = time.perf_counter() - start
        print(f"{what}: tokenized {totals['rows']} rows on {world} process(es) in {seconds:.1f} s "
              f"({totals['rows'] / seconds:.0f} rows/s)", flush=True)
    accelerator.wait_for_everyone()


def _damaged_parts(folder: Path, chunks: int) -> list[tuple[int, str]]:
    """(part, what is wrong) for each part of a complete cache that cannot be read back whole."""
    damaged = []
    for k in range(chunks):
        try:
            part = _read_part(folder, k)
            if len(part.offsets) != 2 * len(part.index) + 1 or int(part.offsets[-1]) != len(part.ids) or len(
                    part.starts) != 2 * len(part.index):
                raise ValueError("its arrays do not agree in length")
        except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
            damaged.append((k, f"{type(err).__name__}: {err}"))
    return damaged


def _manifest(parts: dict[str, str], settings: TokenSettings, chunks: int, totals: dict, complete: bool) -> dict:
    return {"format_version": FORMAT_VERSION, "fingerprint": fingerprint.combined(parts), "fingerprint_parts": parts,
            "form": settings.form, "chunks": chunks, **totals, "complete": complete}


def _changes(manifest: dict, parts: dict[str, str]) -> list[str]:
    """What differs between a cache's manifest and this run ([] when it matches)."""
    if manifest.get("format_version") != FORMAT_VERSION:
        return ["format_version"]
    return fingerprint.changed_parts(manifest, parts)


def prepare_split(cfg: Config, accelerator, name: str, spec, tokenizer) -> PreferenceData:
    """The split `name` (`data.train` / `data.eval` = `spec`), from the token cache; the cache is
    built first when it is missing, incomplete or stale (every rank calls this)."""
    what = f"data.{name}"
    sources = resolve_sources(spec, what)
    settings = token_settings(sources, cfg.data, what)
    parts = collectives.on_main_broadcast(
        accelerator, lambda: fingerprint_parts(sources, tokenizer, settings, cfg.data.chunk_rows))
    root, folder = cfg.token_cache_dir, cfg.token_cache_dir / name
    manifest = fingerprint.read_manifest(folder, "token cache")
    changed = [] if manifest is None else _changes(manifest, parts)
    damaged = [] if manifest is None or changed or not manifest["complete"] else collectives.on_main_broadcast(
        accelerator, lambda: _damaged_parts(folder, manifest["chunks"]))
    if manifest is None or changed or damaged or not manifest["complete"]:
        accelerator.wait_for_everyone()  # every rank has read the manifest before it changes

        def open_folder() -> None:  # only ever deletes what a token cache writes (see `ownership`)
            ownership.claim(root, "token cache", "data.cache_dir")
            if changed:
                print(f"token cache {folder} was built from different {', '.join(changed)}; rebuilding", flush=True)
                ownership.remove_own(root, "token cache", "data.cache_dir", below=name)
            for k, problem in damaged:
                print(f"token cache part {_part_path(folder, k, 'json')} is damaged ({problem}); rebuilding it",
                      flush=True)
                _part_path(folder, k, "json").unlink()  # the part's completion mark: _build writes it anew
            if manifest is None or changed:
                folder.mkdir(parents=True, exist_ok=True)
                fingerprint.write_json_atomic(folder / "manifest.json", _manifest(parts, settings, 0, {}, False))

        collectives.on_main_broadcast(accelerator, open_folder)
        _build(folder, sources, tokenizer, settings, cfg.data.chunk_rows, parts, accelerator, what)
        manifest = fingerprint.read_manifest(folder, "token cache")
    return _split([_read_part(folder, k) for k in range(manifest["chunks"])], manifest["form"], sources, what,
                  cfg.data.max_length)
