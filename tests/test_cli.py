import subprocess
import sys

from limoe.cli import main


def test_info_prints_every_preset(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "small", "B/32", "B/16", "L/16"):
        assert f"\n{name} " in out
    assert "active params" in out and "GFLOPs/image" in out


def test_info_rejects_unknown_preset(capsys):
    assert main(["info", "XXL"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "limoe", "info", "small"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("preset") and "\nsmall " in out


def test_set_overrides_parse_json_values_and_keep_the_rest_as_strings():
    from limoe.cli import parse_overrides

    assert parse_overrides(["width=128", "router_noise_std=0.125", "batch_priority=false", "image_mean=[0.5,0.5,0.5]",
                            "aux_loss=classic", "moe_layers=1,3", "moe_layers_=every_2", "x=tiny"]) == {
        "width": 128, "router_noise_std": 0.125, "batch_priority": False, "image_mean": [0.5, 0.5, 0.5],
        "aux_loss": "classic", "moe_layers": "1,3", "moe_layers_": "every_2", "x": "tiny"}
    assert parse_overrides(None) == {}
