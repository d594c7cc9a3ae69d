"""The bad-input suite: one row per mistake users make or fault they meet, run through the real CLI
(in this process, so a row costs a fraction of a second), each checked for its exit code, the key
words of its one line, no traceback, and that nothing outside the run's own folder changed (every
file byte-identical). A row's `setup` builds what it needs in a fresh folder and returns the
command line; `inject` (optional) puts a fault deep inside while it runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, chat_rows, text_rows, write_jsonl
from dpo_dist import cli
from dpo_dist.errors import PREEMPTED_EXIT_CODE


@dataclass
class Case:
    family: str
    name: str
    setup: Callable  # (World) -> argv
    phrases: tuple[str, ...]
    code: int = 2
    inject: Callable | None = None  # (monkeypatch) -> None
    where: str = "err"  # the stream the phrases are in: err, or out (warnings)


@dataclass
class World:
    """A fresh folder with a tiny model and data; `run` is the run's own output folder."""

    root: Path
    tiny: dict
    extra: list[str] = field(default_factory=list)

    @property
    def run(self) -> Path:
        return self.root / "run"

    def model(self, name: str = "policy", source: str = "policy") -> Path:
        """A private copy of a tiny model (its checks are cached by path: each row has its own)."""
        target = self.root / name
        if not target.exists():
            shutil.copytree(self.tiny[source], target)
        return target

    def data(self, rows=None, name: str = "train.jsonl") -> Path:
        return write_jsonl(self.root / name, text_rows(8, seed=5) if rows is None else rows)

    def args(self, command: str = "precompute", *extra: str, policy: Path | None = None, data=None) -> list[str]:
        policy = policy or self.model()
        data = data or self.data()
        return [command, f"output_dir={self.run}", f"model.policy={policy}", f"data.train={data}",
                "train.max_steps=1", "train.report_to=none", "train.micro_batch_size=2", *extra]

    def raw(self, text: str, name: str = "train.jsonl") -> Path:
        path = self.root / name
        path.write_text(text)
        return path


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    """Every file under `root` but those in `skip`, with its content's digest."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.parents}


def config_row(*overrides: str, phrases: tuple[str, ...]) -> Case:
    return Case("config", overrides[0], lambda w: w.args("precompute", *overrides), phrases)


def finished_run(w: World) -> Path:
    """A folder holding a finished run (its final model), as a user's `runs/` would."""
    done = w.root / "runs" / "exp0"
    (done / "final").mkdir(parents=True)
    (done / "final" / "model.safetensors").write_bytes(os.urandom(256))
    (done / "notes.md").write_text("my results\n")
    return w.root / "runs"


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def model_with(w: World, change: Callable[[Path], None], name: str = "broken") -> Path:
    folder = w.model(name)
    change(folder)
    return folder


def other_vocabulary(w: World) -> Path:
    from dpo_dist.tiny import save_tiny_model

    folder = save_tiny_model(w.root / "other_vocab", ["zebra quantum xylophone " * 20] * 20, seed=3)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 4096}))  # as many embeddings as needed
    return folder


def wider_model(w: World) -> Path:
    from dpo_dist.tiny import save_tiny_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(w.tiny["policy"])
    return save_tiny_model(w.root / "wider", [], seed=0, tokenizer=tokenizer, hidden_size=96)


def trained(w: World, *extra: str) -> list[str]:
    """A 2-step training run in w.run (checkpoint each step), then the argv to train it again."""
    first = w.args("train", "train.max_steps=2", "train.save_every=1", *extra)
    with _no_exit():
        cli.main(first)
    return first


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        assert kind is None, f"the set-up run failed: {err}"
        return False


def holding_lock(w: World) -> list[str]:
    """Another process holding the run folder's lock, as a second `dpo-dist train` would."""
    w.run.mkdir(parents=True)
    (w.run / ".dpo_dist.json").write_text(json.dumps({"kind": "run"}))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(w.run / '.dpo_dist.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.pwrite(fd, b'{\"host\": \"gpu-node-7\", \"pid\": ' + str(os.getpid()).encode() + b', '"
        " b'\"started\": \"2026-12-07 08:00:00\"}\\n', 0)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    w.extra.append(holder)
    return w.args("precompute")


def raising(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


def signal_self(signum: int):
    def send(*args, **kwargs):
        if signum == signal.SIGINT:  # a job started in the background (CI under nohup) inherits Ctrl-C ignored
            signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signum)
        time.sleep(1)  # the handler runs at the next bytecode; never reached
    return send


def at_step(step: int, fail):
    """Trainer.train_step, failing (fail()) at optimizer step `step` (1-based)."""
    from dpo_dist.training.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, positions, sums):
        if self.step + 1 == step:
            fail()
        return original(self, positions, sums)
    return train_step


def pretokenized(ids: list[int]) -> list[dict]:
    return [{"prompt_input_ids": [1, 2, 3], "chosen_input_ids": ids, "rejected_input_ids": [5, 6]}]


CASES = [
    # --- config: every key by range and meaning, before any work ---
    config_row("train.lr=nan", phrases=("train.lr=nan", "a finite number > 0")),
    config_row("train.lr=0", phrases=("train.lr=0.0", "a finite number > 0")),
    config_row("loss.beta=-0.1", phrases=("loss.beta=-0.1", "> 0")),
    config_row("loss.beta=.inf", phrases=("loss.beta=inf", "finite")),
    config_row("train.adam_betas=[0.9]", phrases=("train.adam_betas=[0.9]", "two numbers in [0, 1)")),
    config_row("train.adam_betas=[0.9, 1.0]", phrases=("train.adam_betas", "two numbers in [0, 1)")),
    config_row("train.weight_decay=-0.01", phrases=("train.weight_decay=-0.01", ">= 0")),
    config_row("train.seed=-5", phrases=("train.seed=-5", "[0, 2^32)")),
    config_row("train.max_steps=0", phrases=("train.max_steps=0", "-1 (run train.epochs) or >= 1")),
    config_row("train.max_steps=-3", phrases=("train.max_steps=-3", "-1 (run train.epochs) or >= 1")),
    config_row("train.epochs=0", phrases=("train.epochs=0", ">= 1")),
    config_row("train.warmup_ratio=1.5", phrases=("train.warmup_ratio=1.5", "[0, 1)")),
    config_row("train.max_grad_norm=.inf", phrases=("train.max_grad_norm=inf", "finite")),
    config_row("train.save_every=-1", phrases=("train.save_every=-1", ">= 0")),
    config_row("train.eval_batch_size=0", phrases=("train.eval_batch_size=0", ">= 1")),
    config_row("data.max_length=1", phrases=("data.max_length=1", "at least one response token")),
    config_row("data.truncation=middle", phrases=("data.truncation='middle'", "keep_end, keep_start, drop")),
    config_row("model.attn_implementation=sdpaa", phrases=("model.attn_implementation='sdpaa'", "did you mean 'sdpa'")),
    config_row("model.attn_implementation=flash_attention_2", phrases=("flash_attention_2", "flash_attn",
                                                                      "not installed")),
    config_row("model.dtype=fp32", phrases=("model.dtype='fp32'", "float32, bfloat16, float16")),
    config_row("loss.label_smoothing=0.7", phrases=("loss.label_smoothing", "[0, 0.5)")),
    config_row("loss.type=dpo", phrases=("loss.type='dpo'", "is not one of")),
    config_row("loss.weights=[0.0]", phrases=("loss.weights=[0.0]", "not all 0")),
    config_row("model.lora.r=0", phrases=("model.lora.r=0", ">= 1")),
    config_row("model.lora.dropout=1.0", phrases=("model.lora.dropout=1.0", "[0, 1)")),
    config_row("model.lora.target_modules=[]", phrases=("model.lora.target_modules=[]", "at least one module")),
    config_row("distributed.timeout_minutes=0", phrases=("distributed.timeout_minutes=0", ">= 1")),
    config_row("train.report_to=tensorbord", phrases=("unknown tracker 'tensorbord'", "did you mean 'tensorboard'")),
    config_row("train.learning_rate=1e-6", phrases=("unknown key 'train.learning_rate'",)),
    config_row("train.micro_batch_size=two", phrases=("train.micro_batch_size='two'", "wrong type")),
    config_row("model.reference=", phrases=("model.reference", "names no model")),
    Case("config", "output_dir empty", lambda w: [*w.args("precompute"), "output_dir="],
         ("output_dir=''", "empty or the current folder")),
    Case("config", "output_dir the current folder", lambda w: [*w.args("precompute"), f"output_dir={w.root}"],
         ("is empty or the current folder",)),
    Case("config", "config file not YAML", lambda w: [*w.args("precompute"), "--config",
                                                        str(w.raw("a: [1, 2\n", "bad.yaml"))], ("not valid YAML",)),
    Case("config", "config file a list", lambda w: [*w.args("precompute"), "--config",
                                                      str(w.raw("- a\n- b\n", "list.yaml"))],
         ("the top level must be a mapping",)),
    Case("config", "config file missing", lambda w: [*w.args("precompute"), "--config", str(w.root / "nope.yaml")],
         ("config file not found",)),
    Case("config", "config file is a folder", lambda w: [*w.args("precompute"), "--config", str(w.root)],
         ("config file", "cannot read it")),
    config_row("train.save_best=eval/loss", phrases=("train.save_best=eval/loss needs data.eval",)),
    Case("config", "both caches in one folder", lambda w: w.args("precompute", f"ref_cache.dir={w.root / 'c'}",
                                                                 f"data.cache_dir={w.root / 'c'}"),
         ("ref_cache.dir and data.cache_dir are one folder",)),
    Case("config", "override without =", lambda w: [*w.args("precompute"), "train.lr"], ("not of the form",)),
    Case("config", "an accelerate FSDP2 config with sequence parallelism",
         lambda w: w.args("train", "distributed.sequence_parallel=2"),
         ("distributed.fsdp2 with distributed.sequence_parallel > 1 is not supported yet", "ZeRO-2/3"),
         inject=lambda mp: (mp.setenv("ACCELERATE_USE_FSDP", "true"), mp.setenv("FSDP_VERSION", "2"))),
    Case("config", "an accelerate FSDP1 config", lambda w: w.args("precompute"),
         ("fsdp_version 1", "FSDP2 only", "fsdp_version: 2"),
         inject=lambda mp: mp.setenv("ACCELERATE_USE_FSDP", "true")),
    Case("config", "FSDP2 and DeepSpeed both", lambda w: w.args("train", "distributed.fsdp2=true",
                                                                  f"distributed.deepspeed={REPO / 'ds_configs/zero2_cpu.json'}"),
         ("distributed.fsdp2=true and a DeepSpeed config", "choose one engine")),

    # --- model folders, tokenizers and vocabularies, before the long work ---
    Case("model", "policy folder missing", lambda w: w.args("precompute", policy=w.root / "nowhere"),
         ("model.policy=", "nowhere")),
    Case("model", "no config.json", lambda w: w.args("precompute", policy=model_with(
        w, lambda f: (f / "config.json").unlink())), ("no config.json",)),
    Case("model", "config.json not JSON", lambda w: w.args("precompute", policy=model_with(
        w, lambda f: (f / "config.json").write_text("{model_type: llama"))), ("config.json is not readable JSON",)),
    Case("model", "config.json without model_type", lambda w: w.args("precompute", policy=model_with(
        w, lambda f: (f / "config.json").write_text("{}"))), ("names no model_type",)),
    Case("model", "half-written safetensors", lambda w: w.args("precompute", policy=model_with(
        w, lambda f: cut_short(f / "model.safetensors"))), ("model.safetensors is damaged", "cut short")),
    Case("model", "index names a missing shard", lambda w: w.args("precompute", policy=model_with(
        w, lambda f: (f / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "model-00002-of-00002.safetensors"}})))),
         ("lacks 1 weight file(s)", "model-00002-of-00002.safetensors")),
    Case("model", "no weights", lambda w: w.args("precompute", policy=model_with(
        w, lambda f: (f / "model.safetensors").unlink())), ("holds no weight files",)),
    Case("model", "a LoRA adapter as policy", lambda w: w.args("precompute", policy=model_with(
        w, lambda f: ((f / "model.safetensors").unlink(), (f / "config.json").unlink(),
                      (f / "adapter_config.json").write_text("{}")))),
         ("is a LoRA adapter, not a whole model",)),
    Case("model", "no tokenizer files", lambda w: w.args("precompute", policy=model_with(
        w, lambda f: [p.unlink() for p in f.glob("*token*")])), ("has no tokenizer files",)),
    Case("model", "tokenizer without an eos token", lambda w: w.args("precompute", policy=model_with(
        w, lambda f: _drop_eos(f))), ("has no eos_token",)),
    Case("data", "a broken save_to_disk folder", lambda w: w.args("precompute", data=_broken_saved_dataset(w)),
         ("is not a readable `datasets.save_to_disk` folder",)),
    Case("model", "reference with another vocabulary",
         lambda w: w.args("precompute", f"model.reference={other_vocabulary(w)}"),
         ("model.reference=", "another vocabulary")),
    Case("model", "reference with fewer embeddings", lambda w: w.args("precompute", "model.reference=" + str(
        model_with(w, lambda f: (f / "config.json").write_text(json.dumps(
            {**json.loads((f / "config.json").read_text()), "vocab_size": 100})), name="small_ref"))),
         ("model.reference=", "100 token embeddings, fewer than the tokenizer's")),
    Case("model", "LoRA targets match nothing", lambda w: w.args("train", "model.lora.target_modules=[query_key]"),
         ("model.lora.target_modules=['query_key'] matches no module", "q_proj")),

    # --- data: the file and the line, or a warning with counts ---
    Case("data", "data file missing", lambda w: w.args("precompute", data=w.root / "none.jsonl"),
         ("file not found", "none.jsonl")),
    Case("data", "glob matching nothing", lambda w: w.args("precompute", data=w.root / "*.parquet"),
         ("matches no file",)),
    Case("data", "unsupported suffix", lambda w: w.args("precompute", data=w.raw("a,b,c\n", "pairs.csv")),
         ("unsupported file type '.csv'",)),
    Case("data", "invalid JSON line", lambda w: w.args("precompute", data=w.raw(
        json.dumps(text_rows(1)[0]) + "\n{oops\n")), ("train.jsonl:2: invalid JSON",)),
    Case("data", "missing field", lambda w: w.args("precompute", data=w.data(
        [*text_rows(2), {"prompt": "a", "chosen": "b"}])), ("train.jsonl:3", "missing field 'rejected'")),
    Case("data", "field of the wrong type", lambda w: w.args("precompute", data=w.data(
        [{"prompt": "a", "chosen": 3, "rejected": "c"}])), ("train.jsonl:1", "'chosen' must be a string")),
    Case("data", "empty field", lambda w: w.args("precompute", data=w.data(
        [{"prompt": "a", "chosen": "", "rejected": "c"}])), ("field 'chosen' is empty",)),
    Case("data", "empty file", lambda w: w.args("precompute", data=w.raw("")), ("holds no rows",)),
    Case("data", "a row that is not an object", lambda w: w.args("precompute", data=w.raw("[1, 2]\n")),
         ("a row must be a JSON object",)),
    Case("data", "columns naming an absent field", lambda w: w.args(
        "precompute", "data.columns={chosen: response_j}"), ("data.columns maps chosen to 'response_j'",
                                                              "no field 'response_j'")),
    Case("data", "forms mixed", lambda w: w.args("precompute", data=w.data([*text_rows(2), *chat_rows(1)])),
         ("train.jsonl:3", "use one form per data set")),
    Case("data", "token id outside the vocabulary", lambda w: w.args("precompute", data=w.data(pretokenized([4, 99999]))),
         ("token id 99999, outside the tokenizer's vocabulary",)),
    Case("data", "every row dropped", lambda w: w.args("precompute", "data.max_length=4", "data.truncation=drop"),
         ("every row was dropped by data.max_length=4",)),
    Case("data", "no shared beginning without a prompt", lambda w: w.args("precompute", data=w.data(
        [{"chosen": "yes indeed", "rejected": "no way"}])), ("share no beginning",)),
    Case("data", "chosen equals rejected (warned)", lambda w: w.args("tokenize", data=w.data(
        [*text_rows(3), {"prompt": "a?", "chosen": " same", "rejected": " same"}])),
         ("warning: 1 pair(s) of 4 have chosen == rejected", "train.jsonl:4"), code=0, where="out"),
    Case("data", "eval file is the training file (warned)", lambda w: w.args(
        "tokenize", f"data.eval={w.data()}"), ("warning: data.eval shares 1 file(s) with data.train",),
         code=0, where="out"),
    Case("data", "response not an assistant turn (warned)", lambda w: w.args("tokenize", data=w.data(
        [*chat_rows(2), {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "a"}],
                         "rejected": [{"role": "assistant", "content": "b"}]}])),
         ("warning: 1 pair(s) of 3 have responses that are not assistant turns", "train.jsonl:3"), code=0, where="out"),

    # --- caches and folders: nothing deleted that dpo_dist did not write ---
    Case("folders", "overwrite of a shared folder as ref cache", lambda w: w.args(
        "precompute", f"ref_cache.dir={finished_run(w)}", "ref_cache.overwrite=true"),
         ("ref_cache.dir=", "holds files a reference cache does not write (exp0)", "folder of its own")),
    Case("folders", "shared folder as token cache", lambda w: w.args("precompute", f"data.cache_dir={finished_run(w)}"),
         ("data.cache_dir=", "holds files a token cache does not write (exp0)")),
    Case("folders", "ref cache dir is a file", lambda w: w.args(
        "precompute", f"ref_cache.dir={w.raw('x', 'cache.txt')}"), ("ref_cache.dir=", "is a file, not a folder")),
    Case("folders", "output_dir is a file", lambda w: [*w.args("precompute"), f"output_dir={w.raw('x', 'out.txt')}"],
         ("output_dir=", "is a file, not a folder")),
    Case("folders", "ref cache in the run folder itself", lambda w: w.args("precompute", f"ref_cache.dir={w.run}"),
         ("ref_cache.dir=", "is output_dir itself", "a folder of its own")),
    Case("folders", "output_dir is a reference cache", lambda w: [*_cache_of_other_data(w, f"ref_cache.dir={w.root / 'c'}"),
                                                                 f"output_dir={w.root / 'c'}"],
         ("output_dir=", "is a dpo_dist reference cache folder, not a run folder")),
    Case("folders", "user config inside output_dir", lambda w: [*w.args("precompute"), "--config", str(
        _user_config(w.run / "config.yaml"))], ("config.yaml was not written by dpo-dist",
                                                "keep your config outside output_dir")),
    Case("folders", "export over a user folder", lambda w: ["export", str(_fake_checkpoint(w)), "--output_dir",
                                                            str(finished_run(w))],
         ("exists and was not written by dpo_dist", "refusing to replace it")),
    Case("folders", "export of a folder that is no checkpoint", lambda w: ["export", str(w.root)],
         ("not a complete dpo_dist checkpoint",)),
    Case("folders", "a second run on one output_dir", holding_lock,
         ("output_dir=", "is in use by another dpo-dist run", "gpu-node-7", "started 2026-12-07 08:00:00")),
    Case("caches", "stale reference cache", lambda w: [*_cache_of_other_data(w), "ref_cache.auto=true"],
         ("ref cache", "was computed from different train data files", "ref_cache.overwrite=true")),
    Case("caches", "corrupt cache manifest", lambda w: w.args("precompute", f"ref_cache.dir={_corrupt_manifest(w)}"),
         ("manifest.json is corrupt",)),
    Case("caches", "damaged token cache part (rebuilt)", lambda w: _damaged_token_part(w),
         ("token cache part", "is damaged", "rebuilding it"), code=0, where="out"),

    # --- resume trusts nothing it has not checked ---
    Case("resume", "resume names no checkpoint", lambda w: w.args("train", f"resume={w.root}"),
         ("not a complete dpo_dist checkpoint",)),
    Case("resume", "another policy of the same shape", lambda w: [
        *trained(w, f"model.reference={w.model()}"), f"model.policy={w.model('other', 'reference')}",
        "train.max_steps=3"], ("model.policy changed since it was written",)),
    Case("resume", "a wider policy", lambda w: [*trained(w, f"model.reference={w.model()}"),
                                                f"model.policy={wider_model(w)}", "train.max_steps=3"],
         ("model.policy changed since it was written",)),
    Case("resume", "zero-byte trainer_state of the only checkpoint", lambda w: _emptied_state(w),
         ("no undamaged checkpoint left",)),
    Case("resume", "evaluate a trained model against itself", lambda w: [
        "evaluate", *trained(w)[1:], f"model.policy={w.run / 'final'}", f"output_dir={w.root / 'eval'}"],
         ("model.reference is not set", "every reward 0", "model it was trained against")),

    # --- signals and faults from deep inside ---
    Case("signals", "Ctrl-C while tokenizing", lambda w: w.args("tokenize"),
         ("interrupted (Ctrl-C) during tokenization of data.train", "complete parts of the token cache"), code=130,
         inject=lambda mp: mp.setattr("dpo_dist.data.token_cache.tokenize_rows", raising(KeyboardInterrupt()))),
    Case("signals", "SIGTERM in the reference pass", lambda w: w.args("precompute"),
         ("interrupted (SIGTERM) during the reference pass", "complete shards of the reference cache"),
         code=PREEMPTED_EXIT_CODE,
         inject=lambda mp: mp.setattr("dpo_dist.reference.precompute.score_shard", signal_self(signal.SIGTERM))),
    Case("signals", "Ctrl-C while training", lambda w: w.args("train", "train.max_steps=3", "train.save_every=1"),
         ("interrupted (Ctrl-C) during training", "checkpoints/latest is step-000001", "resume=auto"), code=130,
         inject=lambda mp: mp.setattr("dpo_dist.training.trainer.Trainer.train_step",
                                      at_step(2, signal_self(signal.SIGINT)))),
    Case("signals", "Ctrl-C while exporting", lambda w: w.args("train", "train.max_steps=1"),
         ("interrupted (Ctrl-C) during the export of final/", "checkpoints/latest is step-000001"), code=130,
         inject=lambda mp: mp.setattr("dpo_dist.training.checkpoint._write_hf_folder", raising(KeyboardInterrupt()))),
    Case("signals", "disk full at export", lambda w: w.args("train", "train.max_steps=1"),
         ("cannot write the model to", "No space left on device", "checkpoints/latest is kept"),
         inject=lambda mp: mp.setattr("dpo_dist.training.checkpoint._write_hf_folder", raising(
             OSError(errno.ENOSPC, "No space left on device")))),
    Case("signals", "read-only file system under a cache shard", lambda w: w.args("precompute"),
         ("cannot use", "shard.safetensors", "Read-only file system"),
         inject=lambda mp: mp.setattr("dpo_dist.reference.cache.save_file", raising(
             OSError(errno.EROFS, "Read-only file system", "shard.safetensors")))),
]


def _drop_eos(folder: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _broken_saved_dataset(w: World) -> Path:
    folder = w.root / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    return folder


def _user_config(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# my settings, with comments\ntrain:\n  lr: 1.0e-6\n")
    return path


def _fake_checkpoint(w: World) -> Path:
    folder = w.root / "ckpt"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "files": {}}))
    from dpo_dist.config import load_config, save_config

    save_config(load_config(None, [f"model.policy={w.model()}"]), folder / "config.yaml")
    (folder / "model.safetensors").write_bytes((w.model() / "model.safetensors").read_bytes())
    return folder


def _cache_of_other_data(w: World, *extra: str) -> list[str]:
    with _no_exit():
        cli.main(w.args("precompute", *extra, data=w.data(text_rows(6, seed=9), "first.jsonl")))
    return w.args("precompute", *extra)


def _corrupt_manifest(w: World) -> Path:
    folder = w.root / "cache"
    folder.mkdir()
    (folder / "manifest.json").write_text("{not json")
    return folder


def _damaged_token_part(w: World) -> list[str]:
    args = w.args("tokenize")
    with _no_exit():
        cli.main(args)
    cut_short(w.run / "token_cache" / "train" / "part-000000.ids.npy")
    return args


def _emptied_state(w: World) -> list[str]:
    args = trained(w, "train.keep_last=1")
    shutil.rmtree(w.run / "final")
    (w.run / "checkpoints" / "step-000002" / "trainer_state.json").write_text("")
    return [*args, "train.max_steps=3"]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}: {c.name}" for c in CASES])
def test_bad_input_gets_one_line_and_loses_nothing(case, tiny, tmp_path, monkeypatch, capsys):
    world = World(tmp_path, tiny)
    monkeypatch.chdir(tmp_path)
    try:
        argv = case.setup(world)
        capsys.readouterr()
        before = snapshot(tmp_path, world.run)
        if case.inject:
            case.inject(monkeypatch)
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
            raise SystemExit(0)
        said = capsys.readouterr()
    finally:
        for process in world.extra:
            process.kill()
    assert stop.value.code == case.code, said.err[-2000:]
    stream = said.err if case.where == "err" else said.out
    lines = [line for line in stream.splitlines() if all(p in line for p in case.phrases)]
    assert lines, f"no line with {case.phrases} in:\n{stream[-3000:]}"
    assert "Traceback" not in said.err
    if case.code:
        assert len([line for line in said.err.splitlines() if line.startswith("dpo-dist ")]) == 1, said.err
    assert snapshot(tmp_path, world.run) == before, "files outside the run changed"


def test_the_suite_covers_every_family():
    families = {}
    for case in CASES:
        families[case.family] = families.get(case.family, 0) + 1
    assert len(CASES) >= 60 and set(families) == {"config", "model", "data", "folders", "caches", "resume", "signals"}


@pytest.mark.parametrize("where,error", [
    ("dpo_dist.reference.cache.save_file", "safetensors"),
    ("dpo_dist.model.loading.AutoModelForCausalLM", "torch"),
    ("dpo_dist.fingerprint.json", "json"),
    ("peft.get_peft_model", "peft"),
])
def test_unforeseen_errors_from_deep_inside_get_one_line_before_the_traceback(where, error, tiny, tmp_path,
                                                                              monkeypatch, capsys):
    """What dpo_dist does not foresee keeps its traceback (it is a bug to report), after one line."""
    world = World(tmp_path, tiny)
    from safetensors import SafetensorError

    exc = {"safetensors": SafetensorError("injected: header too large"), "torch": RuntimeError("injected: CUDA error"),
           "json": TypeError("injected: Object of type Tensor is not JSON serializable"),
           "peft": ValueError("injected: peft internal")}[error]
    if where.endswith("AutoModelForCausalLM"):
        import transformers

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", raising(exc))
    elif error == "json":  # fingerprint's own json only (not every module's)
        monkeypatch.setattr(where, types.SimpleNamespace(dumps=raising(exc), loads=json.loads,
                                                         JSONDecodeError=json.JSONDecodeError))
    else:
        monkeypatch.setattr(where, raising(exc))
    command = "train" if error == "peft" else "precompute"
    with pytest.raises(type(exc)):
        cli.main(world.args(command, *(["model.lora.r=4"] if error == "peft" else [])))
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"dpo-dist {command}: error: unexpected {type(exc).__name__}: injected")
               for line in err), err
