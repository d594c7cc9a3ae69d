"""Experiment trackers through accelerate: every metric key reaches TensorBoard, wandb (offline)
and MLflow (a file store), with the resolved config as hyper-parameters."""

import json
import struct

import pytest

from conftest import run_cli, text_rows, write_jsonl


@pytest.fixture(scope="module")
def tracked_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    train = write_jsonl(root / "train.jsonl", text_rows(16, seed=5))
    held_out = write_jsonl(root / "eval.jsonl", text_rows(6, seed=6))
    out = root / "run"
    result = run_cli("train", f"output_dir={out}", f"model.policy={tiny['policy']}", f"data.train={train}",
                     f"data.eval={held_out}", "train.max_steps=4", "train.log_every=2", "train.eval_every=2",
                     "train.report_to=[tensorboard, wandb, mlflow]", "train.run_name=tracked", "train.project=dpo_tests",
                     env={"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                          "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    keys = set()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        keys |= {k for k, v in json.loads(line).items() if k != "step" and v is not None}
    return root, out, keys


def test_mlflow_file_store_gets_every_metric_and_the_config(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    root, _, keys = tracked_run
    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("dpo_tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked"
    assert keys <= set(run.data.metrics), keys - set(run.data.metrics)
    assert "eval/rewards/accuracies" in keys and "loss" in keys
    assert run.data.params["loss.beta"] == "0.1" and run.data.params["train.max_steps"] == "4"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4]


def wandb_records(path):
    """The protobuf records of an offline wandb run file (LevelDB log blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts, block = path.read_bytes(), 7, [], 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += room
            continue
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def test_wandb_offline_run_gets_every_metric_and_the_config(tracked_run):
    _, out, keys = tracked_run
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged, config = set(), set()
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            logged |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "config":
            config |= {item.key for item in record.config.update}
    assert keys <= logged, keys - logged
    assert {"loss.beta", "train.max_steps", "model.policy"} <= config


def test_tensorboard_gets_every_metric(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, keys = tracked_run
    tags = set()
    for events in (out / "tensorboard").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert keys <= tags, keys - tags


def test_unknown_or_missing_tracker_is_one_line(tiny, tmp_path):
    result = run_cli("train", f"output_dir={tmp_path}", f"model.policy={tiny['policy']}", "data.train=x.jsonl",
                     "train.report_to=[tensorbord]")
    assert result.returncode == 2 and "did you mean 'tensorboard'" in result.stderr
