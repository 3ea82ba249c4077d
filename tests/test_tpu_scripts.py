import pathlib
import subprocess

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "tpu_scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_tpu_script_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"create.sh", "setup.sh", "run.sh", "sweep.sh", "delete.sh"} <= names
