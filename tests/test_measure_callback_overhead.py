import json
import statistics

from scripts_loader import load_script


def test_overhead_script_writes_its_measurements(tmp_path):
    script = load_script("measure_callback_overhead")
    result = script.main(["--quick", "--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "callback_overhead.json").read_text())
    assert saved == result and saved["step_seconds"] > 0 and saved["entropy_step_seconds"] > 0
    every, entropy = saved["recorded_over_plain"], saved["entropy_over_plain"]
    assert every == statistics.median(saved["recorded_over_plain_rounds"])
    assert entropy == statistics.median(saved["entropy_over_plain_rounds"])
    assert saved["amortised_overhead"] == (every - 1) + (entropy - every) / saved["entropy_every_n_steps"]
    assert "| tiny llama | 4 x 32 |" in (tmp_path / "callback_overhead.md").read_text()


def test_overhead_script_measures_the_distillation_teacher(tmp_path):
    script = load_script("measure_callback_overhead")
    result = script.main(["--quick", "--distillation", "--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "distillation_overhead.json").read_text())
    assert saved == result and saved["step_seconds"] > 0 and saved["distilled_step_seconds"] > 0
    assert saved["distilled_over_plain"] == statistics.median(saved["distilled_over_plain_pairs"])
    assert saved["teacher_megabytes"] == saved["teacher_parameters"] * 4 / 1e6  # fp32 weights
    assert len(saved["load_average"]["before"]) == len(saved["load_average"]["after"]) == 3
    assert "| tiny llama | 4 x 32 |" in (tmp_path / "distillation_overhead.md").read_text()
    assert not (tmp_path / "callback_overhead.json").exists()
