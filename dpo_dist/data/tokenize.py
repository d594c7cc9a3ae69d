"""Rows -> token ids, a chunk at a time with batched fast-tokenizer calls, into flat arrays.

Text and conversational rows get the ids TRL 1.16's DPOTrainer makes (EOS text appended to text
completions; prompt and prompt+completion tokenized separately; the completion starts where the two
diverge), so log-probs and losses match TRL's for the same tokenizer — from one encoding of each
prompt and each response, joined at safe cuts (`_encode_pairs`). Pre-tokenized rows are used
verbatim. Then each sequence is cut to `max_length` per `truncation`, or the pair is dropped.
"""

from __future__ import annotations

import functools
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


def _fit(ids: list[int], start: int, max_length: int, truncation: str) -> tuple[list[int], int] | None:
    """(ids, response start) of a prompt+response sequence cut to `max_length`; None when no response is left."""
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


def _is_safe_cut(text: str, at: int) -> bool:
    """A single space between two non-space characters: a regex pre-tokenizer (GPT-2, Llama 3, Qwen)
    or a Metaspace one starts a piece there whatever comes before or after, so the tokens of
    text[:at] and text[at:] joined are the tokens of `text` (`joins_at_safe_cuts` checks it per tokenizer)."""
    return 0 < at < len(text) - 1 and text[at] == " " and not text[at - 1].isspace() and not text[at + 1].isspace()


def _last_safe_cut(text: str) -> int:
    """The last safe cut of `text`, else 0."""
    at = text.rfind(" ", 0, len(text) - 1)
    while at > 0 and not _is_safe_cut(text, at):
        at = text.rfind(" ", 0, at)
    return max(at, 0)


def _first_safe_cut(text: str, start: int) -> int:
    """The first safe cut of `text` at or after `start`, else len(text)."""
    at = text.find(" ", start)
    while at != -1 and not _is_safe_cut(text, at):
        at = text.find(" ", at + 1)
    return len(text) if at == -1 else at


PROBES = ("Hello world, this is a test.", "The year 2024 had 366 days: 12 months 4096 tokens 3.14159 x",
          "emoji 😀 here 🎉🎉 ok 👍🏽 fine", "中文 字符 测试 混合English 文本", "tabs\tand\nnew lines\n\nhere  two  spaces",
          "don't won't it's we'll they're I'm", "punct!! ?? ... (paren) [br] {cb} end.", "Ünïcödé wörds naïve café ﬁ",
          "e\u0301 combining marks a\u0308", "a b c d e f g h i j", "x1 y2 z3 100 200 300 1e9",
          "User: tell me\nAssistant: sure thing", "    leading and trailing    ")


@functools.lru_cache(maxsize=8)
def joins_at_safe_cuts(tokenizer: Any) -> bool:
    """Whether `tokenizer` joins at safe cuts, the property `_encode_pairs` builds on: its
    pre-tokenizer starts a piece at every safe cut of a bank of probes (digits, emoji, CJK, accents,
    contractions, its EOS text), so no token spans one, and tok(s) == tok(s[:c]) + tok_ns(s[c:])
    there, with and without special tokens. Not for slow tokenizers, a BPE without pre-tokenizer
    or one that keeps spaces inside pieces (Metaspace without split), special tokens that eat
    neighbouring spaces, or tokens added at the end: their pairs are encoded whole."""
    if not getattr(tokenizer, "is_fast", False):
        return False
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    if any(getattr(t, "lstrip", False) or getattr(t, "rstrip", False) or " " in str(t) for t in added):
        return False
    if tokenizer("a")["input_ids"][-1:] != tokenizer("a", add_special_tokens=False)["input_ids"][-1:]:
        return False  # suffix special tokens
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    if pre_tokenizer is None:
        return False  # BPE over the whole text: a merge may cross any space
    eos = tokenizer.eos_token or ""
    for text in (*PROBES, f"end of turn {eos} next {eos}"):
        cuts = [c for c in range(len(text)) if _is_safe_cut(text, c)]
        if not set(cuts) <= {start for _, (start, _) in pre_tokenizer.pre_tokenize_str(text)}:
            return False  # a piece spans a safe cut (Metaspace without split, say)
        for specials in (True, False):
            whole = tokenizer(text, add_special_tokens=specials)["input_ids"]
            heads = tokenizer([text[:c] for c in cuts], add_special_tokens=specials)["input_ids"]
            tails = tokenizer([text[c:] for c in cuts], add_special_tokens=False)["input_ids"]
            if any(head + tail != whole for head, tail in zip(heads, tails)):
                return False
    return True


def _batch_encoder(tokenizer):
    """`tokenizer(strings, add_special_tokens=add)["input_ids"]` as a function of (strings, add),
    straight from the Rust tokenizer's `encode_batch_fast` (no offsets kept: ~1.3x faster than the
    call) where the call does only that: a transformers fast tokenizer that overrides no encoding,
    set up by one call (no truncation, no padding, its special-token splitting)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    def call(strings: list[str], add: bool) -> list[list[int]]:
        return tokenizer(strings, add_special_tokens=add)["input_ids"]

    if getattr(type(tokenizer), "_encode_plus", None) is not TokenizersBackend._encode_plus:
        return call
    call(["x"], True)
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        return call
    fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda strings, add: [encoding.ids for encoding in fast(strings, add_special_tokens=add)]


def _encode_pairs(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str],
                  specials: bool) -> list[tuple[int, list[int], list[int]]]:
    """(response start, chosen ids, rejected ids) as TRL derives them from tok(prompt), tok(whole
    chosen text) and tok(whole rejected text) (the responses start where those diverge), where
    `chosen[i]` / `rejected[i]` are whole texts that usually start with `prompts[i]`. Each prompt is
    encoded once and each response once: a whole text is
    cut at the prompt's last safe cut L and at the first one R from the boundary on, and
    tok(text[:L]) (the prompt's, shared), tok(text[L:R]) (a few words across the boundary, where
    tokens can merge) and tok(text[R:]) are joined. Without a cut in the prompt the text is
    tok(text[:R]) + tok(text[R:]); a text not starting with its prompt, or every text of a
    tokenizer that fails `joins_at_safe_cuts`, is encoded whole."""
    windows = joins_at_safe_cuts(tokenizer)
    lefts = [_last_safe_cut(prompt) if windows else 0 for prompt in prompts]
    heads = [prompt[:left] if left else prompt for prompt, left in zip(prompts, lefts)]  # the whole prompt: tail ""
    tails = [prompt[left:] if left else "" for prompt, left in zip(prompts, lefts)]
    texts = [*chosen, *rejected]
    joined, firsts, rests = [], [], []  # joined: first part follows the prompt's head
    for k, text in enumerate(texts):
        prompt, left = prompts[k % len(prompts)], lefts[k % len(prompts)]
        follows = windows and text.startswith(prompt)
        right = len(text)
        if follows:
            right = len(prompt) if _is_safe_cut(text, len(prompt)) else _first_safe_cut(text, len(prompt) + 1)
        joined.append(bool(left) and follows)
        firsts.append(text[left:right] if joined[-1] else text[:right])
        rests.append(text[right:])

    batch = _batch_encoder(tokenizer)

    def encode(strings: list[str], add: bool) -> list[list[int]]:
        return batch(strings, add) if strings else []

    head_ids, tail_ids, rest_ids = encode(heads, specials), encode(tails, False), encode(rests, False)
    joined_ids = iter(encode([f for f, j in zip(firsts, joined) if j], False))
    alone_ids = iter(encode([f for f, j in zip(firsts, joined) if not j], specials))
    whole = [(head_ids[k % len(prompts)] + next(joined_ids) if joined[k] else next(alone_ids)) + rest_ids[k]
             for k in range(len(texts))]
    out = []
    for pair, (head, tail) in enumerate(zip(head_ids, tail_ids)):
        c, r = whole[pair], whole[len(prompts) + pair]
        # Tokens can merge across the prompt/response boundary, and chat templates may render a
        # prompt differently alone: the response starts where the two tokenizations diverge.
        prompt_ids = head + tail
        out.append((min(_common_prefix_length(prompt_ids, c), _common_prefix_length(prompt_ids, r)), c, r))
    return out


def _tokenize_texts(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str]) -> list[tuple]:
    eos = tokenizer.eos_token

    def with_eos(text: str) -> str:
        return text if text.endswith(eos) else text + eos

    return _encode_pairs(tokenizer, prompts, [p + with_eos(c) for p, c in zip(prompts, chosen)],
                         [p + with_eos(r) for p, r in zip(prompts, rejected)], specials=True)


TOKENIZING_KEYS = {"tokenize", "return_dict", "tokenizer_kwargs", "sanitize_control_tokens", "return_tensors",
                   "padding", "truncation", "max_length", "return_assistant_tokens_mask"}


def _tokenize_dialogues(tokenizer, prompts: list[list], chosen: list[list], rejected: list[list],
                        kwargs: dict) -> list[tuple]:
    """Rendered by the chat template to text (as `apply_chat_template(tokenize=True)` does), then
    encoded without special tokens added (the template writes them)."""
    tokenizing = sorted(TOKENIZING_KEYS & set(kwargs))
    if tokenizing:
        raise UserError(f"data.chat_template_kwargs: {', '.join(tokenizing)} would change how the rendered "
                        "text is tokenized, which dpo_dist does itself; pass only the template's own variables")

    def render(conversations: list[list], **extra) -> list[str]:
        return tokenizer.apply_chat_template(conversations, tokenize=False, **kwargs, **extra)

    return _encode_pairs(tokenizer, render(prompts, add_generation_prompt=True),
                         render([p + c for p, c in zip(prompts, chosen)]),
                         render([p + r for p, r in zip(prompts, rejected)]), specials=False)


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
        tokenized = [(len(p), p + c, p + r) for p, c, r in zip(prompts, chosen, rejected)]  # verbatim: nothing added
    else:
        if form == "text":
            tokenized = _tokenize_texts(tokenizer, prompts, chosen, rejected)
        else:
            tokenized = _tokenize_dialogues(tokenizer, prompts, chosen, rejected, settings.chat_template_kwargs)

    index, sequences, starts = [], [], []
    truncated = dropped = 0
    for k, ((where, _), (response_start, c, r)) in enumerate(zip(rows, tokenized)):
        if len(c) == response_start or len(r) == response_start:
            raise UserError(f"{where}: a response tokenizes to no tokens beyond the prompt")
        fitted = [_fit(ids, response_start, settings.max_length, settings.truncation) for ids in (c, r)]
        if None in fitted:
            dropped += 1
            continue
        truncated += int(max(len(c), len(r)) > settings.max_length)
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
