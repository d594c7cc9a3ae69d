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


# --- sources, column names, template arguments ---------------------------------------------------


def same_pairs(a, b) -> bool:
    return len(a.pairs) == len(b.pairs) and all(
        x.index == y.index and x.chosen == y.chosen and x.rejected == y.rejected for x, y in zip(a.pairs, b.pairs))


def test_folders_saved_datasets_and_column_names_give_the_same_pairs(tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpo_dist.config import DatasetSource

    rows = text_rows(9)
    reference = load_preference_data(str(write_jsonl(tmp_path / "all.jsonl", rows)), tok, 1024, "keep_end")
    (tmp_path / "shards").mkdir()
    for k, start in enumerate(range(0, 9, 4)):  # a folder of parquet shards, read in name order
        pq.write_table(pa.Table.from_pylist(rows[start:start + 4]), tmp_path / "shards" / f"part-{k}.parquet")
    assert same_pairs(load_preference_data(str(tmp_path / "shards"), tok, 1024, "keep_end"), reference)

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    saved = load_preference_data(str(tmp_path / "saved"), tok, 1024, "keep_end", chunk_rows=4)
    assert same_pairs(saved, reference) and saved.files and all(f.suffix == ".arrow" for f in saved.files)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows)}
                         ).save_to_disk(str(tmp_path / "saved_dict"))
    picked = load_preference_data(DatasetSource(path=str(tmp_path / "saved_dict"), split="test"), tok, 1024, "keep_end")
    assert same_pairs(picked, reference)
    with pytest.raises(UserError, match="holds splits train, test"):
        load_preference_data(str(tmp_path / "saved_dict"), tok, 1024, "keep_end")

    renamed = [{"question": r["prompt"], "response_j": r["chosen"], "response_k": r["rejected"]} for r in rows]
    mapped = load_preference_data(str(write_jsonl(tmp_path / "renamed.jsonl", renamed)), tok, 1024, "keep_end",
                                  columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    assert same_pairs(mapped, reference)


def test_chat_template_arguments_reach_the_template(tok, tmp_path, chat_file):
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = "{% if shout %}!{% endif %}" + tok.chat_template
    plain = load_preference_data(str(chat_file), tok, 1024, "keep_end")
    shouted = load_preference_data(str(chat_file), tok, 1024, "keep_end", chat_template_kwargs={"shout": True})
    assert "!" not in tok.decode(plain.pairs[0].chosen.ids)
    assert tok.decode(shouted.pairs[0].chosen.ids).lstrip("<s>").startswith("!")


def test_out_of_vocabulary_ids_name_file_line_and_field(tok, tmp_path):
    rows = [{"prompt_input_ids": [1, 5], "chosen_input_ids": [6], "rejected_input_ids": [7]},
            {"prompt_input_ids": [1, 5], "chosen_input_ids": [6], "rejected_input_ids": [len(tok) + 3]}]
    with pytest.raises(UserError, match=rf"d.jsonl:2: field 'rejected_input_ids' holds token id {len(tok) + 3}, "
                                        r"outside the tokenizer's vocabulary"):
        load_preference_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, 64, "keep_end")


def test_implicit_prompt_without_a_shared_beginning_is_refused(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "yes it is", "rejected": "no it is not"}])
    with pytest.raises(UserError, match="d.jsonl:1: chosen and rejected share no beginning"):
        load_preference_data(str(path), tok, 64, "keep_end")
