"""FSDP2 as an engine (issue 30): 2 CPU processes over gloo under a user's accelerate FSDP2 config
(or torchrun with distributed.fsdp2=true) train to the weights of one process, build the same
reference cache, write DCP checkpoints that resume on one process and under DeepSpeed, and take a
ZeRO checkpoint over. Every run is a real launch."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, accelerate, run_cli, text_rows, torchrun, write_jsonl

pytestmark = pytest.mark.slow

ONE = (["train.micro_batch_size=2"], None)  # the same global batch as 1 pair x 2 processes
FSDP2_X2 = (["train.micro_batch_size=1"], "fsdp2_cpu.yaml")
ZERO2_X2 = (["train.micro_batch_size=1"], "zero2_cpu.yaml")
ZERO3_X2 = (["train.micro_batch_size=1"], "zero3_cpu.yaml")
ports = iter(range(29861, 29900))


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    data = write_jsonl(root / "train.jsonl", text_rows(24, seed=3))
    args = [f"model.policy={tiny['policy']}", f"model.reference={tiny['reference']}", f"data.train={data}",
            "train.lr=1e-3", "train.log_every=1", "train.save_every=2", "train.keep_last=10", "train.max_steps=4"]
    return root, args


def train(out, args, layout, *extra, resume_from=None):
    """A run in `out` under `layout` (settings, accelerate config); `resume_from`: a checkpoint copied
    into it first, continued with resume=auto."""
    if resume_from is not None:
        shutil.copytree(resume_from, out / "checkpoints" / resume_from.name)
        (out / "checkpoints" / "latest").write_text(resume_from.name + "\n")
    settings, launcher = layout
    result = run_cli("train", f"output_dir={out}", *args, *settings, *extra,
                     launcher=accelerate(launcher, next(ports)) if launcher else None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "row by row" not in result.stdout  # under FSDP2 no rank loaded a model whole
    if resume_from is not None:
        assert f"resumed from {out / 'checkpoints' / resume_from.name} at step 2" in result.stdout
    return result


def weights(out, name="model.safetensors"):
    return load_file(out / "final" / name)


def assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def one(base):
    root, args = base
    train(root / "one", args, ONE)
    return root / "one"


@pytest.fixture(scope="module")
def sharded(base):
    root, args = base
    result = train(root / "fsdp2", args, FSDP2_X2)
    assert "engine: FSDP2" in result.stdout and "2 process(es)" in result.stdout
    return root / "fsdp2"


def test_two_processes_train_to_one_process_weights_with_the_same_reference_cache(tiny, one, sharded):
    assert_same(weights(sharded), weights(one))
    start = load_file(tiny["policy"] / "model.safetensors")
    assert max((weights(one)[k] - start[k]).abs().max() for k in start) > 1e-3  # it trained
    caches = sorted((one / "ref_cache").glob("*.safetensors"))
    assert caches
    for path in caches:
        mine, theirs = load_file(path), load_file(sharded / "ref_cache" / path.name)
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(theirs[key], mine[key], atol=1e-5, rtol=0, msg=key)
    checkpoint = sharded / "checkpoints" / "step-000002"
    assert (checkpoint / "fsdp2" / ".metadata").is_file() and len(list((checkpoint / "fsdp2").glob("*.distcp"))) == 2
    assert json.loads((checkpoint / "trainer_state.json").read_text())["layout"]["engine"] == "fsdp2"


def test_weights_not_readable_row_by_row_load_whole_then_shard(tiny, base, sharded, tmp_path):
    """A policy saved as pytorch_model.bin (no safetensors header to read rows from): each rank
    loads it whole, then shards it, and trains to the same weights."""
    root, args = base
    policy = shutil.copytree(tiny["policy"], tmp_path / "bin-policy")
    torch.save(load_file(policy / "model.safetensors"), policy / "pytorch_model.bin")
    (policy / "model.safetensors").unlink()
    settings, launcher = FSDP2_X2
    result = run_cli("train", f"output_dir={tmp_path / 'out'}", *args, *settings, f"model.policy={policy}",
                     launcher=accelerate(launcher, next(ports)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "policy: its safetensors cannot be read row by row; loading it whole, then sharding" in result.stdout
    assert_same(weights(tmp_path / "out"), weights(sharded))


def test_checkpoint_resumes_on_one_process_and_under_zero2(base, sharded, tmp_path):
    root, args = base
    step = sharded / "checkpoints" / "step-000002"
    expected = weights(sharded)
    train(tmp_path / "one-fsdp2", args, ONE, "distributed.fsdp2=true", resume_from=step)  # DCP reshards 2 -> 1
    assert_same(weights(tmp_path / "one-fsdp2"), expected)
    result = train(tmp_path / "zero2", args, ZERO2_X2, resume_from=step)  # through the universal layout
    assert "written by 2 processes under FSDP2, continuing as 2 processes under DeepSpeed ZeRO-2" in result.stdout
    assert_same(weights(tmp_path / "zero2"), expected)
    train(tmp_path / "plain", args, ONE, resume_from=step)
    assert_same(weights(tmp_path / "plain"), expected)


def test_zero3_checkpoint_continues_under_fsdp2(base, tmp_path):
    root, args = base
    train(tmp_path / "zero3", args, ZERO3_X2)
    result = train(tmp_path / "then-fsdp2", args, FSDP2_X2, resume_from=tmp_path / "zero3" / "checkpoints" /
                   "step-000002")
    assert "under DeepSpeed ZeRO-3, continuing as 2 processes under FSDP2" in result.stdout
    assert_same(weights(tmp_path / "then-fsdp2"), weights(tmp_path / "zero3"))


def test_lora_adapter_is_whole_and_equals_one_process(base, tmp_path):
    root, args = base
    lora = ["model.lora.r=4", "model.lora.dropout=0"]  # dropout masks are drawn per rank
    train(tmp_path / "one", args, ONE, *lora)
    train(tmp_path / "two", args, FSDP2_X2, *lora)
    mine, theirs = (weights(tmp_path / name, "adapter_model.safetensors") for name in ("one", "two"))
    assert any("lora_B" in k for k in theirs) and all(v.shape == mine[k].shape for k, v in theirs.items())
    assert_same(theirs, mine)
    assert max(v.abs().max() for k, v in theirs.items() if "lora_B" in k) > 0  # it trained


def test_bf16_trains_from_fp32_shards_and_exports_them(tiny, base, one, tmp_path):
    """bf16 forward (MixedPrecisionPolicy), fp32 shards as the masters: close to the fp32 run, and
    the float32 export is not a bf16 copy cast up."""
    root, args = base
    result = train(tmp_path / "bf16", args, FSDP2_X2, "train.mixed_precision=bf16")
    assert "forward weights bfloat16" in result.stdout and "FSDP2's fp32 shards" in result.stdout
    exported, fp32 = weights(tmp_path / "bf16"), weights(one)
    values = torch.cat([v.flatten() for v in exported.values()])
    assert values.dtype == torch.float32 and (values.bfloat16().float() == values).float().mean() < 0.5
    start = load_file(tiny["policy"] / "model.safetensors")
    update, expected = (torch.cat([(w[k].float() - start[k]).flatten() for k in start]) for w in (exported, fp32))
    assert torch.nn.functional.cosine_similarity(update, expected, dim=0) > 0.99


def test_tied_embeddings_under_torchrun(tmp_path):
    """One unit owns the shared embedding / head weight; torchrun with distributed.fsdp2=true."""
    from dpo_dist.tiny import build_tokenizer, save_tiny_model

    texts = [" ".join(WORDS)] * 4 + [r["prompt"] + r["chosen"] for r in text_rows(100, seed=7)]
    policy = save_tiny_model(tmp_path / "tied", [], seed=0, tokenizer=build_tokenizer(texts), tied=True)
    data = write_jsonl(tmp_path / "train.jsonl", text_rows(16, seed=4))
    args = [f"model.policy={policy}", f"data.train={data}", "train.lr=1e-3", "train.max_steps=3",
            "train.save_every=0"]
    one = run_cli("train", f"output_dir={tmp_path / 'one'}", *args, "train.micro_batch_size=2")
    two = run_cli("train", f"output_dir={tmp_path / 'two'}", *args, "train.micro_batch_size=1",
                  "distributed.fsdp2=true", launcher=torchrun(next(ports)))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    assert "engine: FSDP2" in two.stdout and "row by row" not in two.stdout
    assert_same(weights(tmp_path / "two"), weights(tmp_path / "one"))
