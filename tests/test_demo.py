"""`dpo-dist demo`, the README's first command, end to end (about a minute on 2 cores)."""

import json
import re

import pytest

from conftest import ZERO_REWARD_TOLERANCE, run_cli


@pytest.mark.slow
def test_demo_learns_held_out_preferences(tmp_path):
    result = run_cli("demo", "--output_dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.findall(r"(before|after) training:\s+reward accuracy ([\d.]+), policy prefers chosen ([\d.]+)",
                       result.stdout)
    values = {when: (float(reward), float(prefers)) for when, reward, prefers in found}
    before = json.loads((tmp_path / "demo" / "eval_before" / "eval_metrics.json").read_text())
    for key in ("eval/rewards/chosen", "eval/rewards/rejected"):  # policy == reference: every reward is 0
        assert abs(before[key]) <= ZERO_REWARD_TOLERANCE, key
    if ZERO_REWARD_TOLERANCE == 0:
        assert values["before"][0] == 0.0  # so no chosen reward beats its rejected one
    assert 0.35 < values["before"][1] < 0.65  # a random model prefers chosen by chance
    assert values["after"][0] > 0.85 and values["after"][1] > 0.85  # 0.946-0.963 measured across CPU kernels
    after = json.loads((tmp_path / "demo" / "eval_after" / "eval_metrics.json").read_text())
    assert after["eval/rewards/accuracies"] == pytest.approx(values["after"][0], abs=1e-3)
