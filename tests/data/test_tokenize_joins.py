"""Each prompt encoded once and each response once, joined at safe cuts (`tokenize._encode_pairs`),
gives exactly TRL's ids from three whole encodings per pair: on the bundled data, on adversarial
strings and on the chat templates of the Llama 3 and Qwen 2 families, with their real pre-tokenizer
regexes (vocabularies trained here: nothing is downloaded). A tokenizer whose tokens can cross a
space (SentencePiece-style Metaspace without splitting) is encoded whole, and still exact."""

import json
import random

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from conftest import REPO, chat_rows, dialogue_rows, hh_rows, text_rows
from dpo_dist.data.rows import extract_prompt
from dpo_dist.data.tokenize import _common_prefix_length, _tokenize_dialogues, _tokenize_texts, joins_at_safe_cuts
from dpo_dist.tiny import build_tokenizer

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PIECES = ["hello", " world", "123", "4567", " 89", "😀", "👍🏽", " 中文", "字符", "!", "?!", " ", "  ", "\n", "\n\n", "a",
          "é", "e\u0301", "don't", " x", "\t", "Ünï", " (", ")", "ﬁ", " 3.14", "'s", "—"]


def corpus() -> list[str]:
    rows = [json.loads(line) for path in ("train.jsonl", "eval.jsonl")
            for line in (REPO / "dpo_dist" / "demo_data" / path).read_text().splitlines()]
    rng = random.Random(7)
    return [json.dumps(r, ensure_ascii=False) for r in rows] + ["".join(rng.choices(PIECES, k=40)) for _ in range(300)]


def regex_tokenizer(split: str, specials: list[str], bos: str | None, eos: str, template: str, nfc: bool):
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=800, special_tokens=specials, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)
    fast.chat_template = template
    return fast


def metaspace_tokenizer(split: bool):
    """SentencePiece-style (Llama 2, Mistral): without `split` one piece per text, so merges may
    cross spaces."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=split)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=split)
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"],
                                                           show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


TOKENIZERS = {
    "tiny (bundled)": lambda: build_tokenizer(corpus(), vocab_size=800),
    "llama3 regex": lambda: regex_tokenizer(LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                           "<|end_header_id|>", "<|eot_id|>"],
                                            "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE, nfc=False),
    "qwen2 regex": lambda: regex_tokenizer(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None,
                                           "<|im_end|>", CHATML_TEMPLATE, nfc=True),
    "metaspace": lambda: metaspace_tokenizer(split=False),
    "metaspace split": lambda: metaspace_tokenizer(split=True),
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request):
    return request.param, TOKENIZERS[request.param]()


def fields(rows: list[dict]) -> list[tuple]:
    """(prompt, chosen, rejected) of each row, the prompt taken from the two answers where implicit."""
    return [(r["prompt"], r["chosen"], r["rejected"]) if "prompt" in r else
            extract_prompt(r["chosen"], r["rejected"], f"row {k}") for k, r in enumerate(rows)]


def trl_ids(prompt_ids, chosen_ids, rejected_ids):
    """TRL 1.16: the response starts where tok(prompt) and tok(prompt + response) diverge; as
    (response start, prompt + chosen, prompt + rejected)."""
    n = min(_common_prefix_length(prompt_ids, chosen_ids), _common_prefix_length(prompt_ids, rejected_ids))
    prompt = prompt_ids[:n]
    return n, prompt + chosen_ids[n:], prompt + rejected_ids[n:]


def adversarial_texts(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(seed)
    make = lambda lo: "".join(rng.choices(PIECES, k=rng.randint(lo, 14)))  # noqa: E731
    return [make(0) for _ in range(n)], [make(1) for _ in range(n)], [make(1) for _ in range(n)]


def test_text_pairs_equal_three_whole_encodings(tokenizer):
    name, tok = tokenizer
    assert joins_at_safe_cuts(tok) == (name != "metaspace"), name
    eos = tok.eos_token
    prompts, chosen, rejected = adversarial_texts(1500, seed=1)
    for p, c, r in fields(text_rows(60, seed=11) + hh_rows(40, seed=12)):
        prompts.append(p)
        chosen.append(c)
        rejected.append(r)
    prompts += ["Q: 12", "no space at the end", "ends with space ", "中文提示", "😀"]  # boundary cases
    chosen += ["345 digits run on", "joined", " two", "回答 here", "🎉 x"]
    rejected += [" 6", "?", "  double", "否", "x"]
    got = _tokenize_texts(tok, prompts, chosen, rejected)
    with_eos = lambda t: t if t.endswith(eos) else t + eos  # noqa: E731
    for k, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        expected = trl_ids(tok(p)["input_ids"], tok(p + with_eos(c))["input_ids"], tok(p + with_eos(r))["input_ids"])
        assert got[k] == expected, (name, p, c, r)


def test_chat_templates_equal_three_whole_encodings(tokenizer):
    name, tok = tokenizer
    prompts, chosen, rejected = [], [], []
    for p, c, r in fields(chat_rows(40, seed=21) + dialogue_rows(40, seed=22)):
        prompts.append(p)
        chosen.append(c)
        rejected.append(r)
    for p, c, r in zip(*adversarial_texts(300, seed=2)):  # adversarial contents in the template
        prompts.append([{"role": "user", "content": p}])
        chosen.append([{"role": "assistant", "content": c}])
        rejected.append([{"role": "assistant", "content": r}])
    got = _tokenize_dialogues(tok, prompts, chosen, rejected, {})

    def render(messages, **extra):
        return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **extra)["input_ids"])

    for k, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        assert got[k] == trl_ids(render(p, add_generation_prompt=True), render(p + c), render(p + r)), (name, p, c)


def test_space_eating_or_suffix_tokens_turn_the_joins_off():
    """Special tokens that strip neighbouring spaces, or an EOS the tokenizer adds at the end, break
    the join's premise: such tokenizers encode whole."""
    from tokenizers import AddedToken

    stripping = TOKENIZERS["tiny (bundled)"]()
    stripping.add_special_tokens({"additional_special_tokens": [AddedToken("<sep>", lstrip=True)]})
    assert not joins_at_safe_cuts(stripping)
    suffixed = TOKENIZERS["tiny (bundled)"]()
    bos, eos = suffixed.bos_token, suffixed.eos_token
    suffixed.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, suffixed.bos_token_id), (eos, suffixed.eos_token_id)])
    assert not joins_at_safe_cuts(suffixed)
    got = _tokenize_texts(suffixed, ["a prompt here"], [" yes it is"], [" no"])
    p = suffixed("a prompt here")["input_ids"]
    assert got[0] == trl_ids(p, suffixed("a prompt here yes it is" + eos)["input_ids"],
                             suffixed("a prompt here no" + eos)["input_ids"])


def test_template_arguments_that_would_tokenize_are_refused():
    """dpo_dist renders the chat template to text and tokenizes it itself: arguments that would
    change that tokenization are refused by name, not passed to the template and ignored."""
    from dpo_dist.errors import UserError

    tok = TOKENIZERS["tiny (bundled)"]()
    rows = fields(chat_rows(2, seed=5))
    with pytest.raises(UserError, match="tokenizer_kwargs would change how the rendered text is tokenized"):
        _tokenize_dialogues(tok, *map(list, zip(*rows)), {"tokenizer_kwargs": {"add_special_tokens": True}})
