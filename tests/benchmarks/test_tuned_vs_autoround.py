"""The pure helpers of benchmarks/tuned_vs_autoround.py: row selection, recipes, ratios, table,
reuse (the measurements themselves need the auto-round venv and run by hand)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from tests.helpers import REPO

SPEC = importlib.util.spec_from_file_location("tuned_vs_autoround",
                                              REPO / "benchmarks" / "tuned_vs_autoround.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_select_rows_defaults_follow_bits():
    assert bench.select_rows(None, 4) == list(bench.ROWS)
    assert "mpq-tuned" not in bench.select_rows(None, 2)
    # table order, whatever order they are asked in
    assert bench.select_rows("auto-round-light, mpq-autoround-light", 3) == [
        "mpq-autoround-light", "auto-round-light"]


@pytest.mark.parametrize("names, bits, message", [
    ("mpq-light", 4, "unknown row 'mpq-light'"),
    ("mpq-tuned", 2, "no tuned preset for int2"),
    (" , ", 4, "names no row"),
])
def test_select_rows_refuses(names, bits, message):
    with pytest.raises(ValueError, match=message):
        bench.select_rows(names, bits)


def test_parse_args_errors_are_usage_errors(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "enwiki_excerpt.train.txt").write_text("text")
    paths = ["--model", str(tmp_path), "--corpora", str(tmp_path)]
    missing = str(tmp_path / "missing")
    for argv, message in ((["--rows", "nope"], "unknown row"),
                          (["--num-samples", "0"], "--num-samples must be at least 1"),
                          (["--bits", "5"], "invalid choice"),
                          (["--corpora", missing], "no enwiki_excerpt.train.txt"),
                          (["--model", missing], "not a model folder"),
                          (["--tuned-recipe", missing], "--tuned-recipe"),
                          (["--bits", "2", "--rows", "mpq-tuned"], "give --tuned-recipe")):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(paths + argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    args = bench.parse_args(paths + ["--bits", "3"])
    assert args.out.name == "tuned_vs_autoround_int3.json"
    assert args.row_names[-1] == "auto-round-default"


def test_recipe_text_is_the_autoround_recipe():
    recipe = yaml.safe_load(bench.recipe_text(3, "light", None))
    assert recipe["defaults"] == {"algorithm": "autoround", "options": {"effort": "light"}}
    assert recipe["rules"][0]["weights"] == {"format": "int", "bits": 3, "symmetric": True,
                                             "granularity": "group", "group_size": 64}
    smoke = yaml.safe_load(bench.recipe_text(4, "default", 2))
    assert smoke["defaults"]["options"] == {"effort": "default", "iters": 2}


def test_peer_settings():
    assert bench.peer_settings("light", None) == (50, 5e-3)
    assert bench.peer_settings("default", None) == (200, None)
    assert bench.peer_settings("light", 2) == (2, 5e-3)


def _row(name, ppl, seconds, rss):
    return {"row": name, "ppl": ppl, "quant_s": seconds, "total_s": seconds + 1,
            "peak_rss_mib": rss + 10, "rss_quant_mib": rss}


def test_ratios_pair_each_row_with_the_same_effort():
    rows = [{"row": "fp32", "ppl": 26.8}, _row("mpq-autoround-light", 30.0, 50.0, 900.0),
            _row("mpq-tuned", 29.0, 10.0, 500.0), _row("auto-round-light", 32.0, 100.0, 1000.0),
            _row("auto-round-default", 31.0, 400.0, 1000.0)]
    bench.add_ratios(rows)
    light, tuned = rows[1], rows[2]
    assert light["time_ratio"] == 0.5 and light["rss_ratio"] == 0.9
    assert light["ppl_ratio"] == pytest.approx(30.0 / 32.0)
    assert tuned["time_ratio"] == 10.0 / 400.0  # the preset is set against the default effort
    assert "time_ratio" not in rows[0] and "time_ratio" not in rows[3]
    table = bench.format_table(rows).splitlines()
    assert table[0].split()[:2] == ["row", "ppl"]
    assert "auto-round-light" in table[2] and "0.50" in table[2]
    assert table[1].split() == ["fp32", "26.800"]  # missing cells stay empty


def test_a_tuned_recipe_makes_the_tuned_row_at_any_bits_and_it_falls_back_to_light():
    assert "mpq-tuned" in bench.select_rows(None, 2, tuned_recipe=True)
    assert bench.select_rows("mpq-tuned", 2, tuned_recipe=True) == ["mpq-tuned"]
    rows = [_row("mpq-tuned", 120.0, 600.0, 2000.0), _row("auto-round-light", 140.0, 1200.0,
                                                          2000.0)]
    bench.add_ratios(rows)
    assert rows[0]["versus"] == "auto-round-light" and rows[0]["time_ratio"] == 0.5
    assert "auto-round-light" in bench.format_table(rows).splitlines()[1]


def test_unpaired_row_has_no_ratio():
    rows = [_row("mpq-autoround-default", 30.0, 50.0, 900.0)]
    bench.add_ratios(rows)
    assert "time_ratio" not in rows[0]


def test_results_and_reuse(tmp_path):
    settings = {"bits": 4, "num_samples": 2, "num_windows": 2, "iters": 2,
                "calibration_sha256": "ab"}
    out = tmp_path / "r.json"
    rows = [_row("mpq-autoround-light", 30.0, 50.0, 900.0),
            _row("auto-round-light", 32.0, 100.0, 1000.0)]
    table = bench.write_results(out, settings, rows)
    assert "mpq-autoround-light" in out.with_suffix(".md").read_text() and table
    written = json.loads(out.read_text())
    assert set(bench.reusable(written, settings)) == {"mpq-autoround-light", "auto-round-light"}
    assert bench.reusable(written, {**settings, "num_samples": 128}) == {}
    assert bench.reusable({}, settings) == {}
