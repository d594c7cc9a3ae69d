"""Preference data: local files -> validated rows -> tokenized pairs.

Three row forms (one per data set, see README "Data"):
  text            {"prompt": str, "chosen": str, "rejected": str}
  conversational  prompt/chosen/rejected as lists of {"role", "content"} messages
  pretokenized    {"prompt_input_ids": [int], "chosen_input_ids": [int], "rejected_input_ids": [int]}

Text and conversational rows are tokenized as TRL 1.16's DPOTrainer does (EOS text appended to text
completions; prompt and prompt+completion tokenized separately; the completion starts where the two
diverge), so log-probs and losses match TRL's for the same tokenizer. A row's `index` is its position
in the data as given (files in the order given, glob matches sorted, then rows): it keys the
reference cache.
"""

from __future__ import annotations

import glob as globlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_dist.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet")
FORMS = {
    "text": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "pretokenized": ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
}


@dataclass(frozen=True)
class Sequence:
    """One prompt+response token sequence; `response_start` is the first response token's position."""

    ids: tuple[int, ...]
    response_start: int

    @property
    def response_tokens(self) -> int:
        return len(self.ids) - self.response_start


@dataclass(frozen=True)
class Pair:
    index: int
    chosen: Sequence
    rejected: Sequence

    @property
    def num_tokens(self) -> int:
        return len(self.chosen.ids) + len(self.rejected.ids)


@dataclass
class PreferenceData:
    pairs: list[Pair]
    form: str
    files: list[Path]
    num_rows: int
    truncated: int = 0
    dropped: int = 0

    def summary(self, name: str) -> str:
        return (
            f"{name}: {len(self.pairs)} pairs from {self.num_rows} rows in {len(self.files)} file(s) "
            f"({self.form}); {self.truncated} truncated, {self.dropped} dropped"
        )


def resolve_files(spec: str | list[str], what: str = "data") -> list[Path]:
    """Expands a path, a glob or a list of them into existing files, in a stable order."""
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
            if not path.is_file():
                raise UserError(f"{what}: file not found: {path}")
            if path.suffix not in SUFFIXES:
                raise UserError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(SUFFIXES)})")
            files.append(path)
    return files


def iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yields (location, row) pairs; the location ("line 7", "row 3") goes into error messages."""
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield f"line {lineno}", json.loads(line)
                    except json.JSONDecodeError as err:
                        raise UserError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        elif path.suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None
            if not isinstance(rows, list):
                raise UserError(f"{path}: a .json data file must hold a list of rows")
            for i, row in enumerate(rows):
                yield f"row {i}", row
        else:
            for i, row in enumerate(_read_parquet(path)):
                yield f"row {i}", row
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except pyarrow.ArrowException as err:
        raise UserError(f"{path}: not a readable parquet file ({err})") from None


def detect_form(row: dict[str, Any]) -> str:
    if all(k in row for k in FORMS["pretokenized"]):
        return "pretokenized"
    if isinstance(row.get("prompt"), list) or isinstance(row.get("chosen"), list):
        return "conversational"
    return "text"


def _check_row(row: Any, form: str, where: str) -> None:
    """Raises a UserError naming the place and the field when a row is not of `form`."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for key in FORMS[form]:
        if key not in row or row[key] is None:
            raise UserError(f"{where}: missing field '{key}' ({form} rows need {', '.join(FORMS[form])})")
        value = row[key]
        if form == "text":
            if not isinstance(value, str):
                raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
            if not value:
                raise UserError(f"{where}: field '{key}' is empty")
        elif form == "conversational":
            if not isinstance(value, list) or not value:
                raise UserError(f"{where}: field '{key}' must be a non-empty list of messages")
            for m in value:
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise UserError(f"{where}: field '{key}': each message needs string 'role' and 'content'")
        else:
            if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                raise UserError(f"{where}: field '{key}' must be a list of token ids (integers)")
            if not value and key != "prompt_input_ids":
                raise UserError(f"{where}: field '{key}' is empty")


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_row(row: dict[str, Any], form: str, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """Returns (prompt_ids, chosen_ids, rejected_ids) exactly as TRL 1.16 `_prepare_dataset` builds them."""
    if form == "pretokenized":
        return list(row["prompt_input_ids"]), list(row["chosen_input_ids"]), list(row["rejected_input_ids"])
    if form == "conversational":
        def render(messages: list[dict], **kw: Any) -> list[int]:
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
            return list(out["input_ids"])

        prompt = render(row["prompt"], add_generation_prompt=True)
        full_chosen = render(row["prompt"] + row["chosen"])
        full_rejected = render(row["prompt"] + row["rejected"])
    else:
        eos = tokenizer.eos_token

        def with_eos(text: str) -> str:
            return text if text.endswith(eos) else text + eos

        prompt = list(tokenizer(row["prompt"])["input_ids"])
        full_chosen = list(tokenizer(row["prompt"] + with_eos(row["chosen"]))["input_ids"])
        full_rejected = list(tokenizer(row["prompt"] + with_eos(row["rejected"]))["input_ids"])
    # Tokens can merge across the prompt/response boundary, and chat templates may render a prompt
    # differently alone: the response starts where the two tokenizations diverge (TRL does the same).
    prompt_len = min(_common_prefix_length(prompt, full_chosen), _common_prefix_length(prompt, full_rejected))
    return prompt[:prompt_len], full_chosen[prompt_len:], full_rejected[prompt_len:]


def _fit(prompt: list[int], response: list[int], max_length: int, truncation: str) -> Sequence | None:
    """Cuts prompt+response to `max_length` per `truncation`; None when nothing of the response is left."""
    ids = prompt + response
    start = len(prompt)
    if len(ids) > max_length:
        if truncation == "drop":
            return None
        if truncation == "keep_end":
            cut = len(ids) - max_length
            ids, start = ids[cut:], max(0, start - cut)
        else:  # keep_start
            ids = ids[:max_length]
    if start >= len(ids):
        return None
    return Sequence(tuple(ids), start)


def load_preference_data(
    spec: str | list[str], tokenizer: Any, max_length: int, truncation: str, what: str = "data"
) -> PreferenceData:
    """Reads, validates and tokenizes every row of `spec`; stops at the first malformed row."""
    files = resolve_files(spec, what)
    pairs: list[Pair] = []
    form: str | None = None
    index = truncated = dropped = 0
    for path in files:
        for loc, row in iter_rows(path):
            where = f"{path}:{loc.split()[-1]}" if loc.startswith("line") else f"{path} {loc}"
            row_form = detect_form(row) if isinstance(row, dict) else (form or "text")
            form = form or row_form
            if row_form != form:
                raise UserError(f"{where}: row is {row_form} but earlier rows are {form}; use one form per data set")
            _check_row(row, form, where)
            if form == "conversational" and getattr(tokenizer, "chat_template", None) is None:
                raise UserError(f"{where}: conversational rows need a tokenizer with a chat template")
            prompt, chosen, rejected = tokenize_row(row, form, tokenizer)
            if not chosen or not rejected:
                raise UserError(f"{where}: a response tokenizes to no tokens beyond the prompt")
            c = _fit(prompt, chosen, max_length, truncation)
            r = _fit(prompt, rejected, max_length, truncation)
            if c is None or r is None:
                dropped += 1
            else:
                truncated += int(len(prompt) + max(len(chosen), len(rejected)) > max_length)
                pairs.append(Pair(index, c, r))
            index += 1
    if form is None:
        raise UserError(f"{what}: {', '.join(map(str, files))} holds no rows")
    if not pairs:
        raise UserError(f"{what}: every row was dropped by data.max_length={max_length}; raise it")
    return PreferenceData(pairs, form, files, index, truncated, dropped)
