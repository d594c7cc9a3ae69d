"""`dpo-dist evaluate` (policy A, reference B) against TRL 1.16's DPOTrainer.evaluate and a plain forward."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli
from dpo_dist.data import load_preference_data
from oracle import naive_logp

BETA = 0.2


def trl_eval(tiny, data_file, tmp_path):
    """TRL's eval metrics and its tokenized rows (prompt_ids, chosen_ids, rejected_ids)."""
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    dataset = load_dataset("json", data_files=str(data_file), split="train")
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], beta=BETA,
        per_device_eval_batch_size=len(dataset), max_length=None,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny["policy"]),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny["reference"]),
        args=args, train_dataset=dataset, eval_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny["policy"]),
    )
    return trainer.evaluate(), trainer.eval_dataset


def ours(tiny, data_file, tmp_path) -> dict:
    out = tmp_path / "ours"
    result = run_cli("evaluate", f"output_dir={out}", f"model.policy={tiny['policy']}",
                     f"model.reference={tiny['reference']}", f"data.train={data_file}", f"loss.beta={BETA}",
                     "train.eval_batch_size=5")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout[result.stdout.index("{"):])
    written = json.loads((out / "eval_metrics.json").read_text())
    assert printed == written
    return written


FORMS = ["text_file", "chat_file", "hh_file", "dialogue_file"]  # hh / dialogue: implicit prompts


@pytest.mark.slow
@pytest.mark.parametrize("data", FORMS)
def test_evaluate_matches_trl(tiny, data, request, tmp_path):
    data_file = request.getfixturevalue(data)
    mine = ours(tiny, data_file, tmp_path)
    trl, trl_rows = trl_eval(tiny, data_file, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny["policy"])
    pairs = load_preference_data(str(data_file), tok, 1024, "keep_end").pairs
    for pair, row in zip(pairs, trl_rows, strict=True):  # same tokens, same response boundary
        assert list(pair.chosen.ids) == row["prompt_ids"] + row["chosen_ids"]
        assert list(pair.rejected.ids) == row["prompt_ids"] + row["rejected_ids"]
        assert pair.chosen.response_start == len(row["prompt_ids"])
    for key in ("logps/chosen", "logps/rejected"):
        assert mine[f"eval/{key}"] == pytest.approx(trl[f"eval_{key}"], rel=2e-4), key
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        trl_key = "eval_loss" if key == "loss" else f"eval_{key}"
        assert mine[f"eval/{key}"] == pytest.approx(trl[trl_key], abs=2e-3), key
    assert mine["eval/rewards/accuracies"] == pytest.approx(trl["eval_rewards/accuracies"], abs=1e-6)


@pytest.mark.parametrize("data", FORMS)
def test_per_pair_logps_match_plain_forward(tiny, data, request):
    """Per pair, through our tokenization, against an unpadded forward of the same tokens (1e-5)."""
    from dpo_dist.data.batching import collate
    from dpo_dist.model.logprobs import sequence_logps

    tok = AutoTokenizer.from_pretrained(tiny["policy"])
    pairs = load_preference_data(str(request.getfixturevalue(data)), tok, 1024, "keep_end").pairs
    for path in (tiny["policy"], tiny["reference"]):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            logps = sequence_logps(model, collate(pairs, tok.pad_token_id)).logps
        for i, pair in enumerate(pairs):
            assert logps[i].item() == pytest.approx(naive_logp(model, pair.chosen), rel=1e-5)
            assert logps[len(pairs) + i].item() == pytest.approx(naive_logp(model, pair.rejected), rel=1e-5)
