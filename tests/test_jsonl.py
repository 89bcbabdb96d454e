import json
import pickle

import pytest

from rlhf_lightning.data.jsonl import DataError, read_jsonl, write_jsonl

REQ = ("prompt", "chosen", "rejected")
OPT = {"margin": (int, float)}
GOOD = {"prompt": "Q: 1+1=\nA:", "chosen": "2", "rejected": "3"}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _error(path, lines, **kw):
    _write(path, lines)
    with pytest.raises(DataError) as ei:
        read_jsonl(path, REQ, OPT, **kw)
    return ei.value, str(ei.value)


def _assert_names(msg, path, line, field):
    assert str(path) in msg
    assert f":{line}:" in msg
    assert f"'{field}'" in msg


def test_loads_blank_lines_extra_fields_duplicates(tmp_path):
    good = json.dumps(GOOD)
    extra = json.dumps({**GOOD, "margin": 1.5, "source": "x", "score": [1, 2]})
    path = _write(tmp_path / "prefs.jsonl", ["", good, "   ", good, extra, ""])
    rows = read_jsonl(path, REQ, OPT)
    assert [n for n, _ in rows] == [2, 4, 5]
    assert rows[0][1] == GOOD
    assert rows[1][1] == GOOD  # duplicate accepted
    assert rows[2][1] == {**GOOD, "margin": 1.5}  # unknown fields dropped
    # integer margin is fine for a float field; a file without trailing newline too
    (tmp_path / "b.jsonl").write_text(json.dumps({**GOOD, "margin": 2}), encoding="utf-8")
    assert read_jsonl(tmp_path / "b.jsonl", REQ, OPT) == [(1, {**GOOD, "margin": 2})]


def test_file_not_found(tmp_path):
    path = tmp_path / "missing.jsonl"
    with pytest.raises(DataError) as ei:
        read_jsonl(path, REQ)
    assert str(path) in str(ei.value)
    assert "not found" in str(ei.value)
    assert ei.value.line is None and ei.value.field is None


def test_invalid_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    err, msg = _error(path, [json.dumps(GOOD), "", '{"prompt": "x", "chosen": '])
    assert str(path) in msg and ":3:" in msg
    assert "invalid JSON" in msg and "Expecting value" in msg
    assert (err.path, err.line) == (str(path), 3)


def test_not_an_object(tmp_path):
    path = tmp_path / "arr.jsonl"
    err, msg = _error(path, [json.dumps(GOOD), json.dumps(["a", "b"])])
    assert str(path) in msg and ":2:" in msg and "object" in msg
    assert err.line == 2


def test_required_field_missing(tmp_path):
    path = tmp_path / "m.jsonl"
    rec = {k: v for k, v in GOOD.items() if k != "chosen"}
    err, msg = _error(path, [json.dumps(GOOD), json.dumps(GOOD), json.dumps(rec)])
    _assert_names(msg, path, 3, "chosen")
    assert "missing" in msg
    assert (err.line, err.field) == (3, "chosen")


def test_required_field_not_a_string(tmp_path):
    path = tmp_path / "data" / "prefs.jsonl"
    path.parent.mkdir()
    lines = [json.dumps(GOOD)] * 6 + [json.dumps({**GOOD, "chosen": 3})]
    err, msg = _error(path, lines)
    assert msg == f"{path}:7: field 'chosen': expected a non-empty string, got 3"


def test_required_field_empty(tmp_path):
    path = tmp_path / "e.jsonl"
    err, msg = _error(path, [json.dumps({**GOOD, "prompt": "   "})])
    _assert_names(msg, path, 1, "prompt")
    assert "non-empty" in msg
    # allowed when non_empty=False
    rows = read_jsonl(path, REQ, OPT, non_empty=False)
    assert rows[0][1]["prompt"] == "   "


@pytest.mark.parametrize("margin", [True, "1.0", None, [1]])
def test_optional_field_wrong_type(tmp_path, margin):
    path = tmp_path / "o.jsonl"
    err, msg = _error(path, [json.dumps(GOOD), json.dumps({**GOOD, "margin": margin})])
    _assert_names(msg, path, 2, "margin")
    assert err.field == "margin"


def test_optional_field_non_finite(tmp_path):
    path = tmp_path / "nan.jsonl"
    err, msg = _error(path, ['{"prompt": "a", "chosen": "b", "rejected": "c", "margin": NaN}'])
    _assert_names(msg, path, 1, "margin")
    assert "finite" in msg


def test_no_records(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match="no records") as ei:
            read_jsonl(path, REQ)
        assert str(path) in str(ei.value)


def test_data_error_is_value_error_and_picklable():
    err = DataError("expected a non-empty string, got 3", "f.jsonl", 7, "chosen")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "f.jsonl:7: field 'chosen': expected a non-empty string, got 3"
    assert (again.path, again.line, again.field) == ("f.jsonl", 7, "chosen")


def test_write_jsonl_round_trip_and_no_temp(tmp_path):
    path = tmp_path / "a" / "b" / "out.jsonl"
    records = [GOOD, {**GOOD, "margin": 0.5}, {"prompt": "é\u2028x", "chosen": "1", "rejected": "2"}]
    assert write_jsonl(path, records) == path
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]
    rows = read_jsonl(path, REQ, OPT)
    assert [r for _, r in rows] == records
    assert [n for n, _ in rows] == [1, 2, 3]


def test_write_jsonl_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [GOOD])
    before = path.read_bytes()

    def gen():
        yield GOOD
        yield {"prompt": float("nan")}

    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_jsonl(path, gen())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
