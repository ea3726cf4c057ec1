import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "finetune_prune.py"


def test_script_fine_tunes_and_prunes_to_the_schedule(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_prune", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main([
        "--quick", "--schedule", '{"0": 0.25, "1": 0.5}', "--epochs", "2", "--train-batches", "3",
        "--val-batches", "2", "--log-dir", str(tmp_path),
    ])
    assert result["pruned_fraction"] == 0.5 and len(result["pruned_heads"]) == 4
    assert result["val_ppl_before"] > 0 and result["val_ppl_after"] > 0
    assert Path(result["checkpoint"]).is_file()
