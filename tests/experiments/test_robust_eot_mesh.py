"""``config.mesh.eot_devices``: robust_eval splits EoT samples over an ``eot`` mesh axis.

On the 8 fake CPU devices of tests/conftest.py: the digits smoke config (batch 8, EoT 2) on a
``(data 4, eot 2)`` mesh against the default 1-D ``data`` mesh; bad values fail before any
work, naming the config field.
"""

import json
import pathlib
import pickle

import numpy as np
import pytest
from _default_opt import run_at_default_optimisation
from exp_helpers import load_config

from experiments import _common, robust_eval


def _smoke(eot_devices=None, row="classifier"):
    cfg = load_config("digits_robust", "smoke")
    # one row (EoT 2), one protocol: two compilations per run
    cfg.rows = tuple(r for r in cfg.rows if r["name"] == row)
    cfg.eval.protocols = ("one_shot",)
    cfg.eval.keep_x_adv = True
    if eot_devices is not None:
        cfg.mesh.eot_devices = eot_devices
    return cfg


def _records(tmp_path, row):
    robust_eval.run(_smoke(None, row), tmp_path / "ref")
    robust_eval.run(_smoke(2, row), tmp_path / "eot2")
    a = np.load(tmp_path / "ref" / row / "per_example.npz")
    b = np.load(tmp_path / "eot2" / row / "per_example.npz")
    m = json.loads((tmp_path / "eot2" / "results.json").read_text())["manifest"]
    assert m["devices"]["count"] == 8 and m["config"]["mesh"]["eot_devices"] == 2
    assert a["index"].tolist() == b["index"].tolist() == list(range(8))
    return a, b


def test_eot_devices_give_the_records_of_the_data_mesh(tmp_path):
    """The classifier row: PGD with EoT 2 (a deterministic model: the EoT samples are equal,
    their gradients summed across the two devices of ``eot``) -- the same records, bit for
    bit."""
    assert _smoke().mesh.eot_devices == 1  # the default: today's 1-D data mesh
    a, b = _records(tmp_path, "classifier")
    for k in ("pred_clean", "pred_adv", "label", "x_adv", "linf", "l2"):
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert np.all(a["linf"] > 0.1)  # the attack moved: the EoT gradients were compared


def _records_at_default_optimisation(tmp_path, row):
    """``_records`` in a fresh process without the suite's compile flags (tests/conftest.py):
    at ``--xla_backend_optimization_level=0`` the gradients of the (data 4, eot 2) and the
    data-only programs differ by float-order noise, and the sign step then flips ~14% of the
    pixels after one iteration (measured 2026-12-01, digits smoke, ddpm_exact); at XLA's
    default optimisation, what users run, they agree bit for bit (1, 2 and 4 iterations)."""
    here = pathlib.Path(__file__)
    code = ("import importlib.util, pathlib, pickle, sys; "
            f"sys.path.insert(0, {str(here.parent)!r}); "
            f"spec = importlib.util.spec_from_file_location('em', {str(here)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            f"a, b = m._records(pathlib.Path({str(tmp_path)!r}), {row!r}); "
            "pickle.dump((dict(a), dict(b)), sys.stdout.buffer)")
    return pickle.loads(run_at_default_optimisation(code))


# ~2 min on the loaded 2-core CPU (the exact-gradient DDPM row compiled twice, in a subprocess
# at XLA's default optimisation); the classifier row above covers the plumbing in CI.
@pytest.mark.slow
def test_eot_devices_give_the_records_of_the_data_mesh_stochastic_purifier(tmp_path):
    """A stochastic DDPM purifier (EoT 2 split over the ``eot`` axis, each sample's key its
    own): the same records, bit for bit."""
    a, b = _records_at_default_optimisation(tmp_path, "ddpm_exact")
    np.testing.assert_array_equal(b["pred_clean"], a["pred_clean"])
    np.testing.assert_array_equal(b["x_adv"], a["x_adv"])
    np.testing.assert_array_equal(b["pred_adv"], a["pred_adv"])
    assert np.all(a["linf"] > 0.05)  # the attack moved


def test_bad_eot_devices_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match=r"mesh.eot_devices=3 does not divide the 8 devices"):
        robust_eval.run(_smoke(3), tmp_path)
    # EoT 2 does not split over 4 devices
    with pytest.raises(ValueError, match=r"rows: classifier: mesh.eot_devices=4: .*eot_samples=2"):
        robust_eval.run(_smoke(4), tmp_path)
    with pytest.raises(ValueError, match="mesh.eot_devices: expected a positive integer"):
        robust_eval.run(_smoke(0), tmp_path)
    assert not list(tmp_path.glob("*/chunks/chunk_*"))
    # experiments that do not split EoT samples reject it rather than idle the devices
    cfg = _smoke(2)
    with pytest.raises(ValueError, match="only experiments/robust_eval.py does"):
        _common.get_mesh(cfg.mesh)
    assert dict(_common.get_mesh(cfg.mesh, eot=True).shape) == {"data": 4, "eot": 2}
