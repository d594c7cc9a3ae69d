"""Data loading: forms, truncation, and one clear error (exit 2, file + line + field) per bad input."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import run_cli, text_rows, write_jsonl
from dpo_dist.data import load_preference_data, resolve_files
from dpo_dist.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["policy"])


def test_text_rows_get_bos_and_eos(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the cat", "chosen": " sat", "rejected": " ran"}])
    pair = load_preference_data(str(path), tok, 64, "keep_end").pairs[0]
    assert pair.chosen.ids[0] == tok.bos_token_id and pair.chosen.ids[-1] == tok.eos_token_id
    assert tok.decode(pair.chosen.ids[pair.chosen.response_start :]) == " sat</s>"


def test_json_parquet_and_glob_keep_order(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = text_rows(6)
    write_jsonl(tmp_path / "a.jsonl", rows[:2])
    (tmp_path / "b.json").write_text(json.dumps(rows[2:4]))
    pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "c.parquet")
    data = load_preference_data(str(tmp_path / "*"), tok, 1024, "keep_end")
    assert [p.index for p in data.pairs] == list(range(6))
    single = load_preference_data(str(tmp_path / "c.parquet"), tok, 1024, "keep_end")
    assert single.pairs[1].chosen == data.pairs[5].chosen
    assert [f.name for f in resolve_files([str(tmp_path / "b.json"), str(tmp_path / "a.jsonl")])] == ["b.json", "a.jsonl"]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start", "drop"])
def test_truncation(tok, tmp_path, mode):
    rows = [{"prompt": "the cat " * 4, "chosen": " sat" * 10, "rejected": " ran"},
            {"prompt": "a", "chosen": " b", "rejected": " c"}]
    data = load_preference_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, 16, mode)
    full = load_preference_data(str(tmp_path / "d.jsonl"), tok, 10_000, mode).pairs[0]
    if mode == "drop":
        assert (len(data.pairs), data.dropped, data.truncated) == (1, 1, 0)
        return
    assert (len(data.pairs), data.truncated) == (2, 1)
    chosen = data.pairs[0].chosen
    assert len(chosen.ids) == 16
    if mode == "keep_end":  # the response survives whole; the prompt loses its start
        assert list(chosen.ids) == list(full.chosen.ids[-16:])
        assert chosen.response_tokens == full.chosen.response_tokens
    else:
        assert list(chosen.ids) == list(full.chosen.ids[:16])
        assert chosen.response_start == full.chosen.response_start


def test_keep_start_drops_rows_whose_prompt_fills_max_length(tok, tmp_path):
    rows = [{"prompt": "the cat " * 20, "chosen": " sat", "rejected": " ran"}, {"prompt": "a", "chosen": " b", "rejected": " c"}]
    data = load_preference_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, 16, "keep_start")
    assert ([p.index for p in data.pairs], data.dropped) == ([1], 1)


BAD = {
    "bad JSON": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', "d.jsonl:2: invalid JSON"),
    "missing field": ('{"prompt": "a", "chosen": "b"}\n', "d.jsonl:1: missing field 'rejected'"),
    "empty field": ('{"prompt": "a", "chosen": "", "rejected": "c"}\n', "d.jsonl:1: field 'chosen' is empty"),
    "wrong type": ('{"prompt": "a", "chosen": "b", "rejected": 3}\n', "d.jsonl:1: field 'rejected' must be a string"),
    "not an object": ('["a", "b"]\n', "d.jsonl:1: a row must be a JSON object"),
    "bad token ids": ('{"prompt_input_ids": [1], "chosen_input_ids": ["x"], "rejected_input_ids": [2]}\n',
                      "d.jsonl:1: field 'chosen_input_ids' must be a list of token ids"),
    "mixed forms": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                    '{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}], '
                    '"rejected": [{"role": "assistant", "content": "c"}]}\n', "d.jsonl:2: row is conversational"),
    "bad message": ('{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "b"}], '
                    '"rejected": [{"role": "assistant", "content": "c"}]}\n', "d.jsonl:1: field 'prompt': each message"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_rows_raise_with_file_line_and_field(tok, tmp_path, case):
    text, expected = BAD[case]
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(UserError, match=expected.replace("[", r"\[")):
        load_preference_data(str(tmp_path / "d.jsonl"), tok, 64, "keep_end")


def test_unreadable_and_missing_files(tok, tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_preference_data(str(tmp_path / "nope.jsonl"), tok, 64, "keep_end")
    with pytest.raises(UserError, match="matches no file"):
        load_preference_data(str(tmp_path / "*.jsonl"), tok, 64, "keep_end")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="bad.parquet: not a readable parquet file"):
        load_preference_data(str(tmp_path / "bad.parquet"), tok, 64, "keep_end")
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "\xe9"}\n')
    with pytest.raises(UserError, match="latin.jsonl: cannot read"):
        load_preference_data(str(tmp_path / "latin.jsonl"), tok, 64, "keep_end")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        load_preference_data(str(tmp_path / "d.txt"), tok, 64, "keep_end")


@pytest.mark.parametrize("case", ["missing field", "bad JSON"])
def test_cli_reports_bad_data_in_one_line_with_exit_2(tiny, tmp_path, case):
    text, expected = BAD[case]
    (tmp_path / "d.jsonl").write_text(text)
    result = run_cli("precompute", f"output_dir={tmp_path / 'out'}", f"model.policy={tiny['policy']}",
                     f"data.train={tmp_path / 'd.jsonl'}")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert expected in last and last.startswith("dpo-dist precompute: error:")
    assert "Traceback" not in result.stderr
