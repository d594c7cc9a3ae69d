"""`dpo-dist report`: a PNG with every curve and a text summary, for one run or several overlaid."""

import json

from conftest import run_cli


def fake_run(path, steps=20, eval_every=5, slope=0.01):
    path.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "epoch": step / 10, "loss": 0.69 - slope * step, "rewards/chosen": 0.01 * step,
                      "rewards/rejected": -0.01 * step, "rewards/margins": 0.02 * step, "rewards/accuracies": 0.5,
                      "logps/chosen": -10.0, "logps/rejected": -12.0, "logps/accuracies": 0.6, "pairs": 8.0,
                      "lr": 1e-6, "grad_norm": 1.0, "pairs_per_s": 4.0 + step % 2, "tokens_per_s": 900.0})
        if step % eval_every == 0:
            lines.append({"step": step, "epoch": step / 10, "eval/loss": 0.7 - 0.02 * step * (step < 15),
                          "eval/rewards/accuracies": 0.5 + 0.02 * step, "eval/rewards/margins": 0.1})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_report_draws_every_curve_and_summarises(tmp_path, monkeypatch):
    import dpo_dist.report as report

    run = fake_run(tmp_path / "run")
    drawn = []
    original = report.curve
    monkeypatch.setattr(report, "curve", lambda lines, key: drawn.append(key) or original(lines, key))
    picture, text = report.write_report([run])
    assert picture == run / "report.png" and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plotted = {key for key in drawn if original(report.read_metrics(run), key)[0]}
    keys = {k for line in report.read_metrics(run) for k in line} - {"step", "epoch", "pairs"}
    assert keys <= plotted, keys - plotted
    assert "20 steps" in text and "best eval loss 0.5000 (step 10)" in text
    assert "best eval accuracy 0.900 (step 20)" in text and "4.50 pairs/s" in text


def test_report_cli_overlays_runs_and_names_a_bad_line(tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", slope=0.02)
    result = run_cli("report", str(a), str(b), "--output", str(tmp_path / "both.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "both.png").stat().st_size > 10_000
    assert str(a) in result.stdout and str(b) in result.stdout
    with (b / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    result = run_cli("report", str(b))
    assert result.returncode == 2 and f"{b / 'metrics.jsonl'}:25" in result.stderr
