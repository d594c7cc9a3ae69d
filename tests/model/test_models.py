"""Models by hub id, resolved offline through the Hugging Face cache (as on compute nodes)."""

import json

import pytest

from conftest import run_cli
from hub_cache import add_to_hub_cache

REVISION = "1" * 40


@pytest.fixture(scope="module")
def hub(tiny, tmp_path_factory):
    """HF_HUB_CACHE with org/policy and org/reference (the tiny models), HF_HUB_OFFLINE=1."""
    cache = tmp_path_factory.mktemp("hub")
    add_to_hub_cache(tiny["policy"], cache, "org/policy", REVISION)
    add_to_hub_cache(tiny["reference"], cache, "org/reference", REVISION)
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def metric_lines(out):
    return [{k: v for k, v in json.loads(line).items() if "per_s" not in k}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_and_evaluate_by_hub_id_equal_the_local_folders(tiny, text_file, chat_file, tmp_path, hub):
    common = [f"data.train={text_file}", f"data.eval={text_file}", "train.max_steps=2", "train.log_every=1",
              "train.lr=1e-3", "train.micro_batch_size=4"]
    models = {"local": [f"model.policy={tiny['policy']}", f"model.reference={tiny['reference']}"],
              "hub": ["model.policy=org/policy", f"model.reference=org/reference@{REVISION}"]}
    for name, model_args in models.items():
        result = run_cli("train", f"output_dir={tmp_path / name}", *model_args, *common, env=hub)
        assert result.returncode == 0, result.stderr[-3000:]
        result = run_cli("evaluate", f"output_dir={tmp_path / name / 'eval'}", *model_args, *common,
                         f"ref_cache.dir={tmp_path / name / 'ref_cache'}", env=hub)
        assert result.returncode == 0, result.stderr[-3000:]
    assert metric_lines(tmp_path / "hub") == metric_lines(tmp_path / "local")
    evaluated = [json.loads((tmp_path / name / "eval" / "eval_metrics.json").read_text()) for name in models]
    assert evaluated[0] == evaluated[1] and evaluated[0]["eval/rewards/chosen"] != 0
    manifests = [json.loads((tmp_path / name / "ref_cache" / "manifest.json").read_text()) for name in models]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]  # same files, same fingerprint
    assert (tmp_path / "hub" / "config.yaml").read_text().count("org/policy") == 1  # the id, as given


@pytest.mark.parametrize("name,why", [("org/missing", "not in the Hugging Face cache"),
                                      (f"org/policy@{'2' * 40}", "not in the Hugging Face cache")])
def test_a_model_not_in_the_cache_is_one_clear_line(text_file, tmp_path, hub, name, why):
    result = run_cli("precompute", f"output_dir={tmp_path}", f"model.policy={name}", f"data.train={text_file}",
                     env=hub)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"model.policy={name}: not a local folder, and {why}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
