import json
import math

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agsearch.policy import Policy, PolicyError, schema, validate


def doc(**over):
    d = {"format": "agsearch.policy", "version": 1, "kind": "static", "num_inference_steps": 3,
         "guidance_scale": 1.5, "steps": [{"op": "cfg"}, {"op": "cfg", "scale": 2.0}, {"op": "cond"}]}
    d.update(over)
    return d


def test_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(schema())


def test_round_trip(tmp_path):
    p = Policy.static(["cfg", {"op": "cfg", "scale": 3.0}, "cond", "uncond"], 1.5, name="x",
                      provenance={"search": {"budget": 6, "seed": 0}})
    path = p.save(tmp_path / "p.json")
    q = Policy.load(path)
    assert q == p and q.nfe == 6 and q.to_dict()["nfe"] == 6
    assert q.scale_at(0) == 1.5 and q.scale_at(1) == 3.0
    jsonschema.validate(json.loads(path.read_text()), schema())  # the file obeys the shipped schema


def test_adaptive_round_trip(tmp_path):
    p = Policy.adaptive(25, 1.5, 0.99)
    q = Policy.load(p.save(tmp_path / "ag.json"))
    assert q == p and q.nfe is None and q.max_nfe == 50
    assert q.rule == {"rule": "ag_cosine", "space": "x0", "threshold": 0.99}


@pytest.mark.parametrize("change, pointer, fragment", [
    (dict(steps=[{"op": "cfg"}, {"op": "foo"}, {"op": "cond"}]), "/steps/1/op", "'foo'"),
    (dict(guidance_scale=-1.0), "/guidance_scale", "-1.0"),
    (dict(guidance_scale=float("nan")), "/guidance_scale", "nan"),
    (dict(guidance_scale="1.5"), "/guidance_scale", "'1.5'"),
    (dict(num_inference_steps=4), "/steps", "3 steps listed"),
    (dict(steps=[{"op": "cfg", "scale": -2}, {"op": "cond"}, {"op": "cond"}]), "/steps/0/scale", "-2"),
    (dict(steps=[{"op": "cond", "scale": 2}, {"op": "cond"}, {"op": "cond"}]), "/steps/0", "scale"),
    (dict(nfe=99), "/nfe", "99"),
    (dict(version=2), "/version", "2"),
    (dict(kind="adaptive"), "", "rule"),
])
def test_errors_name_the_field_and_the_value(change, pointer, fragment):
    with pytest.raises(PolicyError) as e:
        Policy.from_dict(doc(**change), "p.json")
    assert e.value.pointer == pointer
    assert fragment in str(e.value)
    assert str(e.value).startswith("p.json")
    assert "\n" not in str(e.value)


def test_load_errors(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{\"format\": ")
    with pytest.raises(PolicyError, match="invalid JSON at line 1"):
        Policy.load(tmp_path / "bad.json")
    (tmp_path / "nan.json").write_text(json.dumps(doc()).replace("1.5", "NaN"))
    with pytest.raises(PolicyError, match="NaN is not allowed"):
        Policy.load(tmp_path / "nan.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PolicyError, match="UTF-8"):
        Policy.load(tmp_path / "bin.json")


def test_resample_maps_steps_by_position():
    p = Policy.static(["cfg"] * 2 + ["cond"] * 3, 1.5)
    assert p.resample(10).ops_string() == "CCCCcccccc"
    assert p.resample(3).ops_string() == "Ccc"
    assert p.resample(5) == Policy.static(["cfg"] * 2 + ["cond"] * 3, 1.5, provenance={"resampled_from": 5})
    with pytest.raises(PolicyError, match="has 5 steps but the sampler runs 10"):
        p.for_steps(10)
    assert p.for_steps(10, resample=True).num_inference_steps == 10
    assert Policy.adaptive(25, 1.5, 0.9).resample(10).num_inference_steps == 10


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    Policy.static(["cfg"], 1.0).save(path)
    before = path.read_text()
    import agsearch.policy as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod.os, "replace", boom)
    with pytest.raises(OSError):
        Policy.static(["cond"], 1.0).save(path)
    assert path.read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]  # no temporary file left behind


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_loader_on_random_json_returns_a_policy_or_a_policy_error(value):
    try:
        Policy.loads(json.dumps(value))
    except PolicyError as e:
        assert "\n" not in str(e)


ops = st.sampled_from([{"op": "cfg"}, {"op": "cond"}, {"op": "uncond"}]) | st.builds(
    lambda w: {"op": "cfg", "scale": w}, st.floats(0, 20))


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, min_size=1, max_size=30), st.floats(0, 20), st.integers(1, 60))
def test_valid_policies_round_trip_and_resample(steps, w, new_t):
    p = Policy.static(steps, w)
    q = Policy.loads(p.dumps())
    assert q == p
    assert q.nfe == sum(2 if s["op"] == "cfg" else 1 for s in steps)
    r = p.resample(new_t)
    assert r.num_inference_steps == new_t and r.nfe <= 2 * new_t


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["/guidance_scale", "/num_inference_steps", "/steps/0/op", "/steps/1/scale", "/kind"]),
       json_values)
def test_mutated_fields_are_rejected_or_valid(pointer, value):
    d = doc()
    parts = pointer.strip("/").split("/")
    target = d
    for p in parts[:-1]:
        target = target[int(p)] if isinstance(target, list) else target[p]
    target[parts[-1]] = value
    try:
        p = Policy.from_dict(d)
    except PolicyError as e:
        assert e.pointer.startswith(pointer.rsplit("/", 1)[0]) or e.pointer in ("", "/steps", "/nfe")
    else:
        validate(p.to_dict())
        assert all(math.isfinite(float(v)) for v in [p.guidance_scale])
