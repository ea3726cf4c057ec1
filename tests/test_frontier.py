import json

from scripts_loader import load_script

frontier = load_script("frontier")


def test_frontier_measures_each_recipe_once_and_writes_table_and_plot(tmp_path):
    output = tmp_path / "frontier"
    recipes = ["dense", "default", "head global 4 epochs"]
    results = frontier.main(["--quick", "--recipes", *recipes, "--output-dir", str(output)])
    runs = results["runs"]
    assert list(runs) == recipes
    dense, default, head = (runs[name] for name in recipes)
    assert dense["pruned_fraction"] == 0 and dense["kv_cache_ratio"] == 1 and dense["plain_transformers_loads"]
    # The job's recipe: one group in three pruned in every layer, a stock config.
    assert abs(default["pruned_fraction"] - 1 / 3) < 1e-6 and abs(default["kv_cache_ratio"] - 2 / 3) < 1e-6
    assert default["parameters_ratio"] < 1 and default["decode_bound"] > 1 and default["plain_transformers_loads"]
    for name, run in runs.items():  # plain transformers opens exactly the folders whose config is a stock one
        config = json.loads((frontier.run_folder(output, name) / "export" / "config.json").read_text())
        assert run["plain_transformers_loads"] == (not config["model_type"].startswith("sentinel_")), name
        assert run["held_out_ppl"] > 1 and run["val_ppl"] > 1
    assert head["kv_cache_ratio"] >= default["kv_cache_ratio"]  # single heads empty fewer groups
    table = (output / "frontier.md").read_text()
    assert "| default **(shipped)** | group | uniform |" in table and " (1.000x) |" in table
    assert (output / "frontier.png").stat().st_size > 10_000

    # A rerun measures only what the folder lacks: a new recipe, timed, and the timing of a measured one (its saved
    # export, no new fit); the others are read back unchanged.
    def stamps(names, file):
        return {name: (frontier.run_folder(output, name) / file).stat().st_mtime for name in names}

    fits = stamps(recipes, "export/config.json")
    others = ["dense", "head global 4 epochs"]
    untouched = stamps(others, "result.json")
    timed_recipe = "default bf16"
    again = frontier.main(["--quick", "--recipes", "default", timed_recipe, "--time", "--output-dir", str(output)])
    assert list(again["runs"]) == ["dense", "default", timed_recipe, "head global 4 epochs"]
    assert stamps(recipes, "export/config.json") == fits and stamps(others, "result.json") == untouched
    assert again["runs"]["default"]["val_ppl"] == default["val_ppl"] and again["runs"]["default"]["decode_speedup"] > 0
    assert "decode_speedup" not in again["runs"]["dense"]
    timed = again["runs"][timed_recipe]
    assert timed["decode_speedup"] > 0 and timed["speed_context"] == 64
    assert timed_recipe in (output / "frontier.md").read_text()
    for name in again["runs"]:  # float32 unless the recipe says bf16, whatever the job's own choice on this device
        saved = (frontier.run_folder(output, name) / "lightning_logs" / "version_0" / "config.yaml").read_text()
        assert f"precision: {'bf16-mixed' if 'bf16' in name else '32-true'}" in saved, name
