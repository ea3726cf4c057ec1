import json

from scripts_loader import load_script


def test_schedules_end_at_the_target_in_three_steps():
    script = load_script("recovery_study")
    assert json.loads(script.schedule_for(0.3)) == {"0": 0.15, "1": 0.3}  # the job's two steps
    assert json.loads(script.schedule_for(0.3, steps=3)) == {"0": 0.1, "1": 0.2, "2": 0.3}
    planned = script.runs([0.5], ["plain", "both"])
    assert list(planned) == ["dense", "plain 50%", "both 50%"]
    assert "--model.distillation=0.5" in planned["both 50%"] and "--pruning.compensate=mean" in planned["both 50%"]
    assert "--model.distillation=0.0" in planned["plain 50%"] and "--pruning.compensate=none" in planned["plain 50%"]


def test_quick_study_compares_every_run_with_the_dense_fine_tune(tmp_path):
    results = load_script("recovery_study").main(["--quick", "--targets", "0.5", "--variants", "plain", "compensation",
                                  "--output-dir", str(tmp_path)])
    runs = results["runs"]
    assert list(runs) == ["dense", "plain 50%", "compensation 50%"]
    assert runs["dense"]["pruned_fraction"] == 0.0
    assert runs["plain 50%"]["pruned_fraction"] == runs["compensation 50%"]["pruned_fraction"] == 0.5
    assert json.loads((tmp_path / "recovery.json").read_text()) == results
    assert "| plain 50% | 0.500 |" in (tmp_path / "recovery.md").read_text()
