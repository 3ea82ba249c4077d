"""experiments/remeasure_probe.py on the committed digits models: two images, two purifications
per key family (about half a minute, mostly compilation)."""

import re

import pytest

from experiments import remeasure_probe


def test_the_probe_scores_one_x_adv_under_four_key_families(capsys):
    assert remeasure_probe.main(["--n", "2", "--num", "2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(ADV|CLEAN|fresh 777|fresh 778)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["ADV", "CLEAN", "fresh 777", "fresh 778"]
    for _, one, mean in rows:  # percentages of 2 images, of 2 x 2 scores
        assert float(one) in (0.0, 50.0, 100.0) and float(mean) in (0.0, 25.0, 50.0, 75.0, 100.0)


@pytest.mark.parametrize("row, match", [("nope", "expected one of"),
                                        ("ddpm_t0.1_dwbox", "stochastic purifier row")])
def test_the_probe_refuses_a_row_it_cannot_probe(row, match, capsys):
    with pytest.raises(SystemExit):
        remeasure_probe.main(["--row", row])
    assert match in capsys.readouterr().err
