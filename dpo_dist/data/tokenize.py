"""Rows -> token ids, a chunk at a time with batched fast-tokenizer calls, into flat arrays.

Text and conversational rows are tokenized as TRL 1.16's DPOTrainer does (EOS text appended to text
completions; prompt and prompt+completion tokenized separately; the completion starts where the two
diverge), so log-probs and losses match TRL's for the same tokenizer. Pre-tokenized rows are used
verbatim. Then each sequence is cut to `max_length` per `truncation`, or the pair is dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpo_dist.data.rows import check_row, extract_prompt, rename_columns
from dpo_dist.data.sources import Row
from dpo_dist.errors import UserError


@dataclass
class TokenSettings:
    """Everything besides the rows and the tokenizer that decides the token ids."""

    max_length: int
    truncation: str  # keep_end, keep_start or drop
    form: str  # text, conversational or pretokenized (of the data set's first row)
    implicit_prompt: bool  # the first row has no prompt: take it from chosen/rejected
    columns: dict[str, str] = field(default_factory=dict)  # data.columns: our names -> the data's
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizedPairs:
    """Pairs as flat arrays: a chunk, a part of the token cache, or a whole split.

    Sequence 2i is pair i's chosen prompt+response, 2i+1 its rejected one: tokens
    ids[offsets[s]:offsets[s+1]], the response from position starts[s] on. index: each pair's row
    number in the data as given (it keys the reference cache). Shapes: index [P] int64,
    offsets [2P+1] int64, starts [2P] int32, ids [T] int32.
    """

    index: np.ndarray
    offsets: np.ndarray
    starts: np.ndarray
    ids: np.ndarray
    rows: int = 0
    truncated: int = 0
    dropped: int = 0

    ARRAYS = ("index", "offsets", "starts", "ids")


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    if b[: len(a)] == a:  # the usual case, compared in C
        return len(a)
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _fit(prompt: list[int], response: list[int], max_length: int, truncation: str) -> tuple[list[int], int] | None:
    """(ids, response start) of prompt+response cut to `max_length`; None when no response is left."""
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
    return ids, start


def _tokenize_texts(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str]) -> tuple[list, list, list]:
    eos = tokenizer.eos_token

    def with_eos(text: str) -> str:
        return text if text.endswith(eos) else text + eos

    return (tokenizer(prompts)["input_ids"],
            tokenizer([p + with_eos(c) for p, c in zip(prompts, chosen)])["input_ids"],
            tokenizer([p + with_eos(r) for p, r in zip(prompts, rejected)])["input_ids"])


def _tokenize_dialogues(tokenizer, prompts: list[list], chosen: list[list], rejected: list[list],
                        kwargs: dict) -> tuple[list, list, list]:
    def render(conversations: list[list], **extra) -> list[list[int]]:
        out = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, **kwargs, **extra)
        return [list(ids) for ids in out["input_ids"]]

    return (render(prompts, add_generation_prompt=True),
            render([p + c for p, c in zip(prompts, chosen)]),
            render([p + r for p, r in zip(prompts, rejected)]))


def _check_vocabulary(rows: list[Row], vocab_size: int) -> None:
    for where, row in rows:
        for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
            bad = next((t for t in row[key] if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise UserError(f"{where}: field '{key}' holds token id {bad}, outside the tokenizer's "
                                f"vocabulary (0..{vocab_size - 1})")


def _warn_of_useless_pairs(rows: list[Row], chosen: list, rejected: list, form: str) -> None:
    """Warns (the run goes on) of pairs that teach nothing or not what DPO means: chosen equal to
    rejected (their gradient is 0), and dialogue responses that are not assistant turns."""
    same = [where for (where, _), c, r in zip(rows, chosen, rejected) if c == r]
    if same:
        print(f"warning: {len(same)} pair(s) of {len(rows)} have chosen == rejected (they train nothing), "
              f"first at {same[0]}", flush=True)
    if form == "conversational":
        odd = [where for (where, _), c, r in zip(rows, chosen, rejected)
               if any(m.get("role") != "assistant" for m in [*c, *r])]
        if odd:
            print(f"warning: {len(odd)} pair(s) of {len(rows)} have responses that are not assistant turns "
                  f"(role other than 'assistant'), first at {odd[0]}", flush=True)


def tokenize_rows(rows: list[Row], first_index: int, tokenizer: Any, settings: TokenSettings) -> TokenizedPairs:
    """Checks and tokenizes `rows` (row numbers first_index, first_index+1, ...) into TokenizedPairs."""
    form = settings.form
    rows = [(where, rename_columns(row, settings.columns)) for where, row in rows]
    if form == "conversational" and getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"{rows[0][0]}: conversational rows need a tokenizer with a chat template")
    fields = []
    for where, row in rows:
        check_row(row, form, settings.implicit_prompt, where)
        if settings.implicit_prompt:
            fields.append(extract_prompt(row["chosen"], row["rejected"], where))
        elif form == "pretokenized":
            fields.append((row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]))
        else:
            fields.append((row["prompt"], row["chosen"], row["rejected"]))
    prompts, chosen, rejected = (list(column) for column in zip(*fields))
    _warn_of_useless_pairs(rows, chosen, rejected, form)

    if form == "pretokenized":
        _check_vocabulary(rows, len(tokenizer))
        tokenized = zip(prompts, chosen, rejected)  # verbatim: nothing added
    else:
        if form == "text":
            prompt_ids, full_chosen, full_rejected = _tokenize_texts(tokenizer, prompts, chosen, rejected)
        else:
            prompt_ids, full_chosen, full_rejected = _tokenize_dialogues(tokenizer, prompts, chosen, rejected,
                                                                         settings.chat_template_kwargs)
        tokenized = []
        for p, c, r in zip(prompt_ids, full_chosen, full_rejected):
            # Tokens can merge across the prompt/response boundary, and chat templates may render a
            # prompt differently alone: the response starts where the two tokenizations diverge.
            n = min(_common_prefix_length(p, c), _common_prefix_length(p, r))
            tokenized.append((p[:n], c[n:], r[n:]))

    index, sequences, starts = [], [], []
    truncated = dropped = 0
    for k, ((where, _), (p, c, r)) in enumerate(zip(rows, tokenized)):
        if not c or not r:
            raise UserError(f"{where}: a response tokenizes to no tokens beyond the prompt")
        fitted = [_fit(list(p), list(response), settings.max_length, settings.truncation) for response in (c, r)]
        if None in fitted:
            dropped += 1
            continue
        truncated += int(len(p) + max(len(c), len(r)) > settings.max_length)
        index.append(first_index + k)
        for ids, start in fitted:
            sequences.append(ids)
            starts.append(start)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    return TokenizedPairs(
        index=np.asarray(index, dtype=np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        starts=np.asarray(starts, dtype=np.int32),
        ids=np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int32, count=int(lengths.sum())),
        rows=len(rows), truncated=truncated, dropped=dropped,
    )
