"""Where preference rows come from, read in chunks so that ranks can share the work.

A split is a list of sources, in order: local `.jsonl` / `.json` / `.parquet` files (a path, a glob,
a folder of such files, or a list of them), a `datasets.save_to_disk` folder, or a hub dataset
(`{path: org/name, split: train, name: CONFIG}`, read by `datasets.load_dataset`, offline from the
HF cache on compute nodes). Rows are read a chunk at a time; a chunk is parsed only by the rank that
tokenizes it. Each row carries its place (`file:line` or `source row N`) for error messages.
"""

from __future__ import annotations

import glob as globlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dpo_dist.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet")
Row = tuple[str, Any]  # (where, row)


@dataclass
class Chunk:
    """`num_rows` consecutive rows of one source; `load()` parses them into (where, row) pairs."""

    num_rows: int
    load: Callable[[], list[Row]]


class Source(Protocol):
    """One input of a split."""

    name: str

    def files(self) -> list[Path]:
        """The files whose bytes decide the rows (their digests go into the caches' fingerprints)."""

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        """The rows in chunks of `chunk_rows` (the last may be shorter)."""


@dataclass
class _LocalFile:
    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def files(self) -> list[Path]:
        return [self.path]


class JsonlFile(_LocalFile):
    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        """Splits lines only: a chunk's JSON is parsed when (and where) it is loaded."""
        lines: list[tuple[int, str]] = []
        with _reading(self.path), self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    lines.append((lineno, line))
                if len(lines) == chunk_rows:
                    yield Chunk(len(lines), lambda lines=lines: self._parse(lines))
                    lines = []
        if lines:
            yield Chunk(len(lines), lambda: self._parse(lines))

    def _parse(self, lines: list[tuple[int, str]]) -> list[Row]:
        rows = []
        for lineno, line in lines:
            try:
                rows.append((f"{self.path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{self.path}:{lineno}: invalid JSON ({err.msg})") from None
        return rows


class JsonFile(_LocalFile):
    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        with _reading(self.path):
            try:
                rows = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise UserError(f"{self.path}: invalid JSON at line {err.lineno} ({err.msg})") from None
        if not isinstance(rows, list):
            raise UserError(f"{self.path}: a .json data file must hold a list of rows")
        for start in range(0, len(rows), chunk_rows):
            part = rows[start : start + chunk_rows]
            yield Chunk(len(part), lambda part=part, start=start: [
                (f"{self.path} row {start + i}", row) for i, row in enumerate(part)])


@dataclass
class TableSource:
    """A parquet file or a `datasets.Dataset` (Arrow, memory-mapped): rows sliced out on demand."""

    name: str
    table: Any  # pyarrow.Table or datasets.Dataset
    data_files: list[Path]

    def files(self) -> list[Path]:
        return self.data_files

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        for start in range(0, len(self.table), chunk_rows):
            count = min(chunk_rows, len(self.table) - start)
            yield Chunk(count, lambda start=start, count=count: self._rows(start, count))

    def _rows(self, start: int, count: int) -> list[Row]:
        if hasattr(self.table, "to_pylist"):  # pyarrow
            part = self.table.slice(start, count).to_pylist()
        else:  # datasets: a dict of columns
            columns = self.table[start : start + count]
            part = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return [(f"{self.name} row {start + i}", row) for i, row in enumerate(part)]


class _reading:
    """Turns I/O and decoding errors while reading `path` into one clear UserError."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if isinstance(err, (OSError, UnicodeDecodeError)):
            raise UserError(f"{self.path}: cannot read ({err})") from None
        return False


def _parquet(path: Path) -> TableSource:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, memory_map=True)
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    return TableSource(str(path), table, [path])


def _file_source(path: Path) -> Source:
    if path.suffix == ".jsonl":
        return JsonlFile(path)
    if path.suffix == ".json":
        return JsonFile(path)
    return _parquet(path)


def _saved_dataset(folder: Path, split: str | None, what: str) -> TableSource:
    """A `datasets.save_to_disk` folder: a Dataset, or a DatasetDict (then `split` picks one)."""
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(folder))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{what}: {folder} is not a readable `datasets.save_to_disk` folder ({type(err).__name__}: "
                        f"{err})") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UserError(f"{what}: {folder} holds splits {', '.join(dataset)}; choose one with "
                            f"{what}={{path: {folder}, split: NAME}}")
        dataset = dataset[split]
    return TableSource(str(folder), dataset, [Path(f["filename"]) for f in dataset.cache_files])


def _hub_dataset(path: str, split: str | None, name: str | None, what: str) -> TableSource:
    import datasets

    try:
        dataset = datasets.load_dataset(path, name, split=split)
    except (FileNotFoundError, ConnectionError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise UserError(f"{what}: cannot load dataset {path!r} (split {split}, name {name}): {err}") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise UserError(f"{what}: dataset {path!r} has splits {', '.join(dataset)}; set `split`")
    return TableSource(f"{path}[{split}]", dataset, [Path(f["filename"]) for f in dataset.cache_files])


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()


def resolve_files(spec: str | list[str], what: str = "data") -> list[Path]:
    """Expands a path, a glob, a folder or a list of them into existing data files, in a stable order."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs or any(not s for s in specs):
        raise UserError(f"{what}: no data file given (set data.train / data.eval)")
    files: list[Path] = []
    for s in specs:
        matches = sorted(globlib.glob(s)) if globlib.has_magic(s) else [s]
        if not matches:
            raise UserError(f"{what}: the pattern '{s}' matches no file")
        for m in matches:
            path = Path(m)
            if path.is_dir():
                inside = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
                if not inside:
                    raise UserError(f"{what}: folder {path} holds no {', '.join(SUFFIXES)} files")
                files.extend(inside)
                continue
            if not path.is_file():
                raise UserError(f"{what}: file not found: {path}")
            if path.suffix not in SUFFIXES:
                raise UserError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(SUFFIXES)})")
            files.append(path)
    return files


def resolve_sources(spec: Any, what: str = "data") -> list[Source]:
    """The sources of a split, in order, from `data.train` / `data.eval` (see the module docstring)."""
    if hasattr(spec, "path"):  # config.DatasetSource
        folder = Path(spec.path)
        if folder.is_dir() and _is_saved_dataset(folder):
            return [_saved_dataset(folder, spec.split, what)]
        return [_hub_dataset(spec.path, spec.split, spec.name, what)]
    specs = [spec] if isinstance(spec, str) else list(spec)
    sources: list[Source] = []
    for s in specs:
        if s and Path(s).is_dir() and _is_saved_dataset(Path(s)):
            sources.append(_saved_dataset(Path(s), None, what))
        else:
            sources.extend(_file_source(path) for path in resolve_files(s, what))
    return sources
