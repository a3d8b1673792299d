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
