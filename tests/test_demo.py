"""The README's first command: `vpo demo` runs the whole loop and says what each stage did."""
import json
import os
import subprocess
import sys

import pytest

from transformers import AutoModelForCausalLM


@pytest.mark.slow
def test_demo_runs_the_whole_loop(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, VPO_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-m", "vpo_ray.cli", "demo", "--out", str(out), "--port", "8123"],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == ["round_0.generate_sft", "round_0.train_sft", "round_1.generate_dpo",
                            "round_1.train_dpo", "serve"]
    for name, s in stages.items():
        assert {"rows_in", "rows_out", "errors", "seconds"} <= set(s), name
    gen = stages["round_0.generate_sft"]
    assert gen["rows_in"] == 24 and gen["rows_out"] > 0
    assert gen["rows_out"] + gen["duplicates"] + gen["errors"] == gen["rows_in"]
    assert stages["round_1.generate_dpo"]["rows_out"] > 0
    assert stages["round_1.train_dpo"]["rows_out"] > 0  # optimizer steps taken
    reply = stages["serve"]["reply"]
    assert reply["prompts"] and reply["prompts"][0].strip()
    assert reply["flags"]["aspect_ratio"] == "16:9"
    # The served optimizer is the DPO export, a Hugging Face model folder.
    model = AutoModelForCausalLM.from_pretrained(summary["optimizer"])
    assert model.num_parameters() > 0
    assert (out / "round_1" / "dpo_data" / "videos.jsonl").exists()
