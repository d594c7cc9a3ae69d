"""Response log-probs against a plain, unpadded transformers forward of each sequence alone."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl
from oracle import naive_logp
from dpo_dist.data.batching import collate
from dpo_dist.data import load_preference_data
from dpo_dist.model.logprobs import install_response_head, sequence_logps, token_logps


def scored(model, pairs, pad_id):
    with torch.no_grad():
        scores = sequence_logps(model, collate(pairs, pad_id))
        logps, tokens = scores.logps, scores.tokens
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


@pytest.mark.parametrize("precision", ["bf16 weights", "bf16 autocast"])
def test_bf16_forward_gives_fp32_sums_near_the_fp32_oracle(tiny, text_file, precision):
    """A bf16 forward (bf16 weights, or autocast over fp32 ones) still returns float32 per-sequence
    sums, within bf16's rounding of the exact fp32 oracle; the response head's logits are fp32."""
    import dpo_dist.model.logprobs as lp

    tok = AutoTokenizer.from_pretrained(tiny["reference"])
    pairs = load_preference_data(str(text_file), tok, 1024, "keep_end").pairs
    oracle = AutoModelForCausalLM.from_pretrained(tiny["reference"])
    dtype = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    model = response_model(tiny["reference"], "sdpa").to(dtype)
    seen = []
    original = lp._fp32_logits
    lp._fp32_logits = lambda *args: seen.append(original(*args).dtype) or original(*args)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
            scores = sequence_logps(model, collate(pairs, tok.pad_token_id, packing="block_mask", share_prefix=True))
    finally:
        lp._fp32_logits = original
    assert scores.logps.dtype == torch.float32 and set(seen) == {torch.float32}
    expected = torch.tensor([naive_logp(oracle, p.chosen) for p in pairs] + [naive_logp(oracle, p.rejected) for p in pairs],
                            dtype=torch.float64)
    torch.testing.assert_close(scores.logps.double(), expected, rtol=2e-2, atol=5e-2)


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
    extra = lambda t, value: torch.cat([t, torch.full((t.shape[0], 7), value, dtype=t.dtype)], 1)  # noqa: E731
    batch.input_ids = extra(batch.input_ids, tok.pad_token_id)
    batch.position_ids = extra(batch.position_ids, 0)
    batch.response_mask = extra(batch.response_mask, False)
    batch.seq_index = extra(batch.seq_index, -1)
    with torch.no_grad():
        padded = sequence_logps(model, batch).logps
    torch.testing.assert_close(padded, torch.cat(full[:2]), rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="module")
def text_pairs(model_and_tokenizer, text_file):
    return load_preference_data(str(text_file), model_and_tokenizer[1], 1024, "keep_end").pairs


def grads_of(model, batch):
    model.zero_grad()
    logps = sequence_logps(model, batch).logps
    (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packing", ["block_mask", "varlen"])
def test_packed_equals_padded(tiny, text_pairs, packing):
    """One packed row with no padding gives the padded batch's log-probs (1e-5) and gradients."""
    attn = "sdpa" if packing == "block_mask" else "flash_attention_2"
    if packing == "varlen":
        pytest.importorskip("flash_attn", reason="varlen packing needs the flash-attn kernels (GPU machines)")
    model = AutoModelForCausalLM.from_pretrained(tiny["reference"], attn_implementation=attn)
    install_response_head(model)
    tok = AutoTokenizer.from_pretrained(tiny["reference"])
    padded = collate(text_pairs, tok.pad_token_id)
    packed = collate(text_pairs, tok.pad_token_id, packing=packing)
    real = sum(p.num_tokens for p in text_pairs)
    if packing == "varlen":
        assert packed.input_ids.shape == (1, real)  # not one padding token
    else:  # rows no longer than the longest sequence, and far less padding than one row each
        assert packed.input_ids.shape[1] == padded.input_ids.shape[1]
        assert packed.input_ids.numel() - real < (padded.input_ids.numel() - real) / 3
    a, grad_a = grads_of(model, padded)
    b, grad_b = grads_of(model, packed)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for name in grad_a:
        torch.testing.assert_close(grad_b[name], grad_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_varlen_boundaries_equal_what_transformers_derives(text_pairs, model_and_tokenizer):
    """collate gives flash varlen its sequence boundaries (int32) and longest length (a Python int),
    equal to what transformers would derive from the position ids in every layer."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    batch = collate(text_pairs, model_and_tokenizer[1].pad_token_id, packing="varlen")
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch.position_ids)
    kwargs = batch.varlen_kwargs()
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and torch.equal(kwargs["cu_seq_lens_q"], cu_q)
    assert torch.equal(kwargs["cu_seq_lens_k"], cu_k)
    assert type(kwargs["max_length_q"]) is int and kwargs["max_length_q"] == kwargs["max_length_k"] == int(max_q)
    assert collate(text_pairs, 0, packing="block_mask").varlen_kwargs() == {}


def test_response_head_equals_full_logits_and_never_builds_them(tiny, text_pairs, monkeypatch):
    """The chunked response-only head gives the full-logits numbers and gradients; the largest
    vocabulary projection it makes is one chunk, never [tokens x vocab] for the batch."""
    import dpo_dist.model.logprobs as lp

    tok = AutoTokenizer.from_pretrained(tiny["reference"])
    batch = collate(text_pairs, tok.pad_token_id)
    plain = AutoModelForCausalLM.from_pretrained(tiny["reference"])
    expected, grad_expected = grads_of(plain, batch)  # no head installed: full logits path

    headed = AutoModelForCausalLM.from_pretrained(tiny["reference"])
    assert install_response_head(headed)
    monkeypatch.setattr(lp, "CHUNK_ROWS", 16)
    shapes = []
    original = lp._target_logps
    monkeypatch.setattr(lp, "_target_logps", lambda h, *a: shapes.append(h.shape[0]) or original(h, *a))
    got, grad_got = grads_of(headed, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name in grad_expected:
        torch.testing.assert_close(grad_got[name], grad_expected[name], rtol=1e-4, atol=1e-6, msg=name)
    response_tokens = sum(p.chosen.response_tokens + p.rejected.response_tokens for p in text_pairs)
    assert max(shapes) == 16 and sum(shapes) == 2 * response_tokens  # forward + recomputation in backward
    assert response_tokens < batch.input_ids.numel() / 2  # prompts and padding were never projected


def test_pack_rows_fits_every_sequence_once():
    from dpo_dist.data.batching import pack_rows

    lengths = [9, 3, 7, 1, 5, 5, 2, 8]
    rows = pack_rows(lengths, 9)
    assert sorted(k for row in rows for k in row) == list(range(8))
    assert all(sum(lengths[k] for k in row) <= 9 for row in rows)
    assert len(rows) == 5  # 40 tokens need at least ceil(40 / 9) = 5 rows


@pytest.mark.parametrize("data", ["text_file", "chat_file", "hh_file", "dialogue_file"])
def test_shared_prefix_equals_padded(tiny, data, request):
    """Each pair's prompt computed once ([prompt | chosen | last prompt token | rejected]) gives the
    padded batch's log-probs and gradients; pairs truncated to different prompts fall back."""
    tok = AutoTokenizer.from_pretrained(tiny["reference"])
    pairs = list(load_preference_data(str(request.getfixturevalue(data)), tok, 1024, "keep_end").pairs)
    pairs += list(load_preference_data(str(request.getfixturevalue(data)), tok, 24, "keep_end").pairs[:3])
    model = AutoModelForCausalLM.from_pretrained(tiny["reference"])
    install_response_head(model)
    shared = collate(pairs, tok.pad_token_id, packing="block_mask", share_prefix=True)
    unshared = collate(pairs, tok.pad_token_id, packing="block_mask")
    prompts_once = sum(p.chosen.response_start - 1 for p in pairs[:-3])
    assert (shared.input_ids != tok.pad_token_id).sum() <= (unshared.input_ids != tok.pad_token_id).sum() - prompts_once
    a, grad_a = grads_of(model, collate(pairs, tok.pad_token_id))
    b, grad_b = grads_of(model, shared)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for name in grad_a:
        torch.testing.assert_close(grad_b[name], grad_a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("data", ["text_file", "dialogue_file"])
@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_eager_equals_sdpa_on_every_layout(tiny, data, layout, request):
    """Eager attention adds a 4-D mask to its scores: packed and shared layouts give it 0 / dtype-min,
    so eager = sdpa = the padded sdpa batch, in log-probs and gradients."""
    tok = AutoTokenizer.from_pretrained(tiny["reference"])
    pairs = list(load_preference_data(str(request.getfixturevalue(data)), tok, 1024, "keep_end").pairs)
    packing = None if layout == "padded" else "block_mask"
    batch = collate(pairs, tok.pad_token_id, packing=packing, share_prefix=layout == "shared")
    expected, grad_expected = grads_of(response_model(tiny["reference"], "sdpa"), collate(pairs, tok.pad_token_id))
    for attn in ("sdpa", "eager"):
        got, grad_got = grads_of(response_model(tiny["reference"], attn), batch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=attn)
        for name in grad_expected:
            torch.testing.assert_close(grad_got[name], grad_expected[name], rtol=1e-4, atol=1e-6, msg=f"{attn} {name}")


def response_model(path, attn: str):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    install_response_head(model)
    return model


def test_flex_attention_equals_padded(tiny, text_file, dialogue_file):
    """FlexAttention with the block mask built from the layout gives the padded batch's log-probs,
    shared and unshared (forward only: PyTorch has no FlexAttention backward on the CPU; gradients
    are checked by benchmarks/gpu_check.sh where a GPU is lent)."""
    tok = AutoTokenizer.from_pretrained(tiny["reference"])
    pairs = [pair for path in (text_file, dialogue_file)
             for pair in load_preference_data(str(path), tok, 1024, "keep_end").pairs]
    pairs += list(load_preference_data(str(dialogue_file), tok, 24, "keep_end").pairs[:3])  # prompts differ
    flex = AutoModelForCausalLM.from_pretrained(tiny["reference"], attn_implementation="flex_attention").eval()
    install_response_head(flex)
    plain = AutoModelForCausalLM.from_pretrained(tiny["reference"]).eval()
    with torch.no_grad():
        expected = sequence_logps(plain, collate(pairs, tok.pad_token_id)).logps
        for share_prefix in (True, False):
            batch = collate(pairs, tok.pad_token_id, packing="flex", share_prefix=share_prefix)
            mask = batch.attention_mask()
            assert type(mask).__name__ == "BlockMask" and mask.shape[-1] == batch.input_ids.shape[1]
            got = sequence_logps(flex, batch).logps
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packing,share_prefix", [(None, False), ("block_mask", False), ("block_mask", True)])
def test_bucketed_widths_change_no_number(tiny, text_pairs, dialogue_file, attn, packing, share_prefix):
    """train.pad_to_multiple_of: widths rounded up to 64 (and to 64 when the columns are cut in 2
    for sequence parallelism) add masked padding only: the log-probs and gradients of the exact width."""
    tok = AutoTokenizer.from_pretrained(tiny["reference"])
    pairs = list(text_pairs) + list(load_preference_data(str(dialogue_file), tok, 1024, "keep_end").pairs)
    model = response_model(tiny["reference"], attn)
    for group in (pairs[:3], pairs[5:7], pairs):  # several widths, one of them a row or two
        exact = collate(group, tok.pad_token_id, packing=packing, share_prefix=share_prefix)
        for shard in ((1, 0), (2, 1)):
            bucketed = collate(group, tok.pad_token_id, packing=packing, share_prefix=share_prefix, multiple_of=64,
                               shard=shard)
            width, exact_width = bucketed.input_ids.shape[1], exact.input_ids.shape[1]
            assert width % 64 == 0 and exact_width <= width < exact_width + 64
            assert bucketed.input_ids.shape[0] == exact.input_ids.shape[0]
            assert torch.equal(bucketed.scoring().tokens, exact.scoring().tokens)
        a, grad_a = grads_of(model, exact)
        b, grad_b = grads_of(model, collate(group, tok.pad_token_id, packing=packing, share_prefix=share_prefix,
                                            multiple_of=64))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for name in grad_a:
            torch.testing.assert_close(grad_b[name], grad_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_flex_widths_round_to_its_blocks(tiny, text_pairs):
    """With flex_attention the run's width multiple is at least FlexAttention's 128-token block,
    and the block mask of a bucketed batch gives the exact width's log-probs."""
    from dpo_dist.config import load_config

    layout = load_config(None, ["model.attn_implementation=flex_attention", "train.pad_to_multiple_of=64"]).batch_layout
    assert layout == {"packing": "flex", "share_prefix": True, "multiple_of": 128}
    assert load_config(None, ["train.pad_to_multiple_of=48"]).batch_layout["multiple_of"] == 48
    tok = AutoTokenizer.from_pretrained(tiny["reference"])
    flex = response_model(tiny["reference"], "flex_attention").eval()
    with torch.no_grad():
        exact = sequence_logps(flex, collate(text_pairs, tok.pad_token_id, packing="flex", share_prefix=True)).logps
        batch = collate(text_pairs, tok.pad_token_id, **layout)
        assert batch.input_ids.shape[1] % 128 == 0
        torch.testing.assert_close(sequence_logps(flex, batch).logps, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packing,share_prefix", [(None, False), ("block_mask", False), ("block_mask", True)])
def test_shared_length_and_wpo_terms_match_naive(tiny, dialogue_file, packing, share_prefix):
    """LD-DPO's sum over the pair's shared length and WPO's mean of log p − log Σp², from the
    response-only head on every layout, against a plain forward with full logits."""
    tok = AutoTokenizer.from_pretrained(tiny["reference"])
    pairs = list(load_preference_data(str(dialogue_file), tok, 1024, "keep_end").pairs)
    model = AutoModelForCausalLM.from_pretrained(tiny["reference"]).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny["reference"]).eval()
    install_response_head(model)
    with torch.no_grad():
        got = sequence_logps(model, collate(pairs, tok.pad_token_id, packing=packing, share_prefix=share_prefix),
                             wpo=True)
    b = len(pairs)
    for j, pair in enumerate(pairs):
        shared = min(pair.chosen.scored_tokens, pair.rejected.scored_tokens)
        for k, seq in ((j, pair.chosen), (b + j, pair.rejected)):
            assert got.shared_logps[k].item() == pytest.approx(naive_logp(plain, seq, shared), rel=1e-5)
            ids = torch.as_tensor(seq.ids, dtype=torch.long)
            with torch.no_grad():
                logits = plain(input_ids=ids[None]).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            aligned = [logp[t - 1, ids[t]] - torch.log((logp[t - 1].exp() ** 2).sum()) for t in range(seq.response_start, len(ids))]
            assert got.wpo[k].item() == pytest.approx(torch.stack(aligned).mean().item(), rel=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layer_checkpointing", [False, True])
def test_wide_rows_masked_a_block_of_queries_at_a_time(tiny, dialogue_file, attn, layer_checkpointing, monkeypatch):
    """Rows too wide for a whole [W, W] mask get it a block of queries at a time (each block
    checkpointed): the padded batch's log-probs and gradients, also with each layer recomputed in
    backward (gradient checkpointing hands the recomputed layer the mask its forward had)."""
    from dpo_dist.data.batching import LayoutMask
    from dpo_dist.model import attention, loading

    tok = AutoTokenizer.from_pretrained(tiny["reference"])
    pairs = list(load_preference_data(str(dialogue_file), tok, 1024, "keep_end").pairs)
    expected, grad_expected = grads_of(response_model(tiny["reference"], "sdpa"), collate(pairs, tok.pad_token_id))
    monkeypatch.setattr(attention, "WHOLE_MASK_ENTRIES", 0)
    monkeypatch.setattr(attention, "MASK_BLOCK_ENTRIES", 1)
    monkeypatch.setattr(attention, "MIN_QUERY_BLOCK", 16)
    blocks = []
    rows = LayoutMask.rows
    monkeypatch.setattr(LayoutMask, "rows", lambda self, *a, **k: blocks.append(a[:2]) or rows(self, *a, **k))
    model = response_model(tiny["reference"], attn)
    if layer_checkpointing:
        loading.checkpoint_layers(model)
    for share_prefix in (False, True):
        blocks.clear()
        batch = collate(pairs, tok.pad_token_id, packing="block_mask", share_prefix=share_prefix)
        got, grad_got = grads_of(model.train(), batch)
        assert (0, 16) in blocks and (16, 32) in blocks  # blocks of 16 queries, no whole mask
        assert max(end - start for start, end in blocks) == 16
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for name in grad_expected:
            torch.testing.assert_close(grad_got[name], grad_expected[name], rtol=1e-4, atol=1e-6, msg=name)
