"""The token cache: each row tokenized once in total by the ranks together, opened memory-mapped by
every rank, rebuilt (naming what changed) when the data, tokenizer or settings change."""

import json
import re
import shutil

import pytest

from conftest import probe_launch, run_cli, text_rows, write_jsonl


@pytest.fixture
def setup(tiny, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", text_rows(30, seed=31))
    args = [f"output_dir={tmp_path / 'out'}", f"model.policy={tiny['policy']}", f"data.train={train}",
            "data.chunk_rows=4"]
    return tmp_path, train, args


def tokenized(records) -> dict[int, list[str]]:
    return {r["rank"]: r["rows"] for r in records if r["kind"] == "tokenized"}


@pytest.mark.slow
def test_two_processes_tokenize_each_row_once_and_read_the_same_cache(setup):
    tmp_path, train, args = setup
    first = probe_launch(["tokenize", *args], 29671, launcher="ddp_cpu.yaml")
    rows = tokenized(first)
    assert rows[0] and rows[1] and not set(rows[0]) & set(rows[1])  # both worked, on different rows
    assert sorted(rows[0] + rows[1]) == sorted(f"{train}:{n}" for n in range(1, 31))  # every row once
    splits = [r for r in first if r["kind"] == "split"]
    assert len(splits) == 2 and splits[0]["ids_sha256"] == splits[1]["ids_sha256"] and splits[0]["pairs"] == 30
    assert all(r["memory_mapped"] for r in splits)

    again = probe_launch(["tokenize", *args], 29672, launcher="ddp_cpu.yaml")
    assert tokenized(again) == {0: [], 1: []}  # a second run tokenizes nothing
    assert {r["ids_sha256"] for r in again if r["kind"] == "split"} == {splits[0]["ids_sha256"]}

    one = run_cli("tokenize", *args, f"data.cache_dir={tmp_path / 'one'}")  # 1 process: the same tokens
    assert one.returncode == 0, one.stderr[-2000:]
    manifests = [json.loads((d / "train" / "manifest.json").read_text()) for d in (tmp_path / "out" / "token_cache",
                                                                                     tmp_path / "one")]
    assert manifests[0] == manifests[1]


def test_a_change_rebuilds_the_cache_and_names_what_changed(setup, tiny):
    tmp_path, train, args = setup
    assert run_cli("tokenize", *args).returncode == 0
    other_tokenizer = tmp_path / "other_tok"
    shutil.copytree(tiny["policy"], other_tokenizer)
    tok_cfg = json.loads((other_tokenizer / "tokenizer_config.json").read_text())
    tok_cfg["eos_token"] = "<unk>"
    (other_tokenizer / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    changes = {
        "data files": [f"data.train={write_jsonl(train, text_rows(31, seed=32))}"],
        "data.max_length": ["data.max_length=20"],
        "tokenizer": [f"model.policy={other_tokenizer}"],
    }
    for part, change in changes.items():
        result = run_cli("tokenize", *args, *change)
        assert result.returncode == 0, result.stderr[-2000:]
        said = re.search(r"token cache (\S+) was built from different ([^;]+); rebuilding", result.stdout)
        assert said and said[1] == str(tmp_path / "out" / "token_cache" / "train"), result.stdout
        assert part in said[2].split(", "), said[2]  # the changes add up: earlier ones are named too
    quiet = run_cli("tokenize", *args, *changes["tokenizer"])
    assert "rebuilding" not in quiet.stdout + quiet.stderr and "tokenizing" not in quiet.stderr


def test_hub_dataset_by_name_from_the_local_cache(setup, tmp_path):
    """`data.train: {path: org/prefs, split: test}` read offline from a datasets cache laid out as an
    online `load_dataset` leaves it gives the same tokens as the local file it was made from."""
    from datasets.packaged_modules.json.json import Json

    _, train, args = setup
    cache = tmp_path / "datasets_cache"
    Json(cache_dir=str(cache), dataset_name="prefs", data_files={"test": str(train)}).download_and_prepare()
    built = next((cache / "prefs").glob("default-*/0.0.0"))  # -> org___prefs/default/0.0.0/REVISION/
    (cache / "org___prefs" / "default" / "0.0.0").mkdir(parents=True)
    shutil.move(built, cache / "org___prefs" / "default" / "0.0.0" / "0123abcd")
    env = {"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = run_cli("tokenize", *args, "data.train={path: org/prefs, split: test}",
                     f"data.cache_dir={tmp_path / 'hub'}", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    local = run_cli("tokenize", *args, f"data.cache_dir={tmp_path / 'local'}")
    assert "train: 30 pairs from 30 rows" in result.stdout + result.stderr
    for k in range(8):
        for array in ("index", "offsets", "starts", "ids"):
            name = f"part-{k:06d}.{array}.npy"
            assert (tmp_path / "hub" / "train" / name).read_bytes() == (tmp_path / "local" / "train" / name).read_bytes()
    missing = run_cli("tokenize", *args, "data.train={path: org/missing}", f"data.cache_dir={tmp_path / 'm'}", env=env)
    assert missing.returncode == 2 and "cannot load dataset 'org/missing'" in missing.stderr
