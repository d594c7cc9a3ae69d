"""Response log-probs against a plain, unpadded transformers forward of each sequence alone."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl
from dpo_dist.batching import collate
from dpo_dist.data import Sequence, load_preference_data
from dpo_dist.logprobs import sequence_logps, token_logps


def naive_logp(model, seq: Sequence) -> float:
    """Sum of log p(token | prefix) over the response tokens of one sequence, no padding, float64."""
    ids = torch.tensor([seq.ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[t - 1, seq.ids[t]].item() for t in range(max(seq.response_start, 1), len(seq.ids)))


def scored(model, pairs, pad_id):
    with torch.no_grad():
        logps, tokens = sequence_logps(model, collate(pairs, pad_id))
    b = len(pairs)
    return logps[:b], logps[b:], tokens[:b], tokens[b:]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["reference"]).eval()
    return model, AutoTokenizer.from_pretrained(tiny["reference"])


def test_token_logps_equals_log_softmax():
    logits = torch.randn(5, 7, 11)
    targets = torch.randint(0, 11, (5, 7))
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logps(logits, targets, rows_per_chunk=2), expected)
    assert token_logps(logits.bfloat16(), targets).dtype == torch.float32


def test_text_pairs_match_naive_forward(model_and_tokenizer, text_file):
    model, tok = model_and_tokenizer
    data = load_preference_data(str(text_file), tok, 1024, "keep_end")
    chosen, rejected, nc, nr = scored(model, data.pairs, tok.pad_token_id)
    for i, pair in enumerate(data.pairs):
        assert chosen[i].item() == pytest.approx(naive_logp(model, pair.chosen), rel=1e-5)
        assert rejected[i].item() == pytest.approx(naive_logp(model, pair.rejected), rel=1e-5)
        assert nc[i] == pair.chosen.response_tokens and nr[i] == pair.rejected.response_tokens


def test_pretokenized_used_verbatim_and_batching_invariant(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    rng = random.Random(3)
    vocab = len(tok)
    rows = [
        {
            "prompt_input_ids": [rng.randrange(4, vocab) for _ in range(rng.randint(1, 20))],
            "chosen_input_ids": [rng.randrange(4, vocab) for _ in range(rng.randint(1, 25))],
            "rejected_input_ids": [rng.randrange(4, vocab) for _ in range(rng.randint(1, 8))],
        }
        for _ in range(9)
    ]
    data = load_preference_data(str(write_jsonl(tmp_path / "tok.jsonl", rows)), tok, 1024, "keep_end")
    assert data.form == "pretokenized"
    for row, pair in zip(rows, data.pairs):  # nothing added: no BOS, no EOS
        assert list(pair.chosen.ids) == row["prompt_input_ids"] + row["chosen_input_ids"]
        assert pair.chosen.response_start == len(row["prompt_input_ids"])

    full = scored(model, data.pairs, tok.pad_token_id)
    for i, pair in enumerate(data.pairs):
        assert full[0][i].item() == pytest.approx(naive_logp(model, pair.chosen), rel=1e-5)
        assert full[1][i].item() == pytest.approx(naive_logp(model, pair.rejected), rel=1e-5)
    # Other batch compositions (so other padding lengths) and one pair alone give the same numbers.
    order = [4, 0, 8, 2, 6, 1, 3, 7, 5]
    for size in (1, 2, 4):
        for start in range(0, len(order), size):
            group = order[start : start + size]
            part = scored(model, [data.pairs[i] for i in group], tok.pad_token_id)
            for j, i in enumerate(group):
                assert part[0][j].item() == pytest.approx(full[0][i].item(), rel=1e-6, abs=1e-5)
                assert part[1][j].item() == pytest.approx(full[1][i].item(), rel=1e-6, abs=1e-5)
    # Extra padding on every row changes nothing.
    batch = collate(data.pairs, tok.pad_token_id)
    pad = torch.full((batch.input_ids.shape[0], 7), tok.pad_token_id)
    batch.input_ids = torch.cat([batch.input_ids, pad], 1)
    batch.attention_mask = torch.cat([batch.attention_mask, torch.zeros_like(pad)], 1)
    batch.response_mask = torch.cat([batch.response_mask, torch.zeros_like(pad, dtype=torch.bool)], 1)
    with torch.no_grad():
        padded, _ = sequence_logps(model, batch)
    torch.testing.assert_close(padded, torch.cat(full[:2]), rtol=1e-6, atol=1e-5)
