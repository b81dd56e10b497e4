import pytest

from agsearch.baselines import make_baseline


def test_cutoff_counts_round_f_t():
    p = make_baseline("cutoff", 25, 1.5, fraction=0.72)
    assert p.ops_string() == "C" * 18 + "c" * 7 and p.nfe == 43


def test_interval_uses_positions_in_a_half_open_window():
    p = make_baseline("interval", 25, 1.5, start=0.12, stop=0.4)
    on = [i for i, s in enumerate(p.steps) if s["op"] == "cfg"]
    assert on == [3, 4, 5, 6, 7, 8, 9]  # 3/25 = 0.12 included, 10/25 = 0.4 excluded
    assert p.name == "interval-3:10/25"


def test_cfg_cond_alternating_ag():
    assert make_baseline("cfg", 4, 2.0).nfe == 8
    assert make_baseline("cond", 4, 2.0).nfe == 4
    assert make_baseline("alternating", 5, 2.0).ops_string() == "CcCcC"
    ag = make_baseline("ag", 25, 1.5, threshold=0.98, space="eps")
    assert ag.kind == "adaptive" and ag.rule["space"] == "eps"


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="cutoff"), "needs --fraction"),
    (dict(name="cutoff", fraction=1.3), "between 0.0 and 1.0, but got 1.3"),
    (dict(name="interval", start=0.5, stop=0.2), "start <= stop"),
    (dict(name="ag", threshold=1.5), "between -1.0 and 1.0"),
    (dict(name="nope"), "unknown baseline 'nope'"),
])
def test_bad_options(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        make_baseline(name, 25, 1.5, **kwargs)
