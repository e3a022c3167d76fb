import json

import pytest

from mmie.core.data import (
    batched,
    read_parallel,
    read_texts,
    sample,
    split_prompt,
)
from mmie.core.errors import DataError
from mmie.lid.filters import filter_script
from tests.conftest import SAMPLE, write_jsonl


def test_formats(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["one", "two"], field="body")
    (tmp_path / "b.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    (tmp_path / "c.tsv").write_text("id\tsent\n1\tone\n2\ttwo\n", encoding="utf-8")
    (tmp_path / "d.csv").write_text('id,sent\n1,"one"\n2,two\n', encoding="utf-8")
    assert read_texts(tmp_path / "a.jsonl", field="body") == ["one", "two"]
    assert read_texts(tmp_path / "b.txt") == ["one", "two"]
    assert read_texts(tmp_path / "c.tsv", field="sent") == ["one", "two"]
    assert read_texts(tmp_path / "d.csv", field="sent") == ["one", "two"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_texts(tmp_path / "none.jsonl")


def test_invalid_utf8_names_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\nbad \xff here\n")
    with pytest.raises(DataError, match=r"bad.txt:2: invalid UTF-8"):
        read_texts(tmp_path / "bad.txt")


def test_invalid_json_names_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        read_texts(tmp_path / "bad.jsonl")


def test_missing_field(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["x"], field="body")
    with pytest.raises(DataError, match=r"a.jsonl:1: no field 'text'"):
        read_texts(tmp_path / "a.jsonl")


def test_empty_set(tmp_path):
    (tmp_path / "e.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no non-empty texts"):
        read_texts(tmp_path / "e.txt")


def test_empty_after_filter_names_counts(tmp_path):
    with pytest.raises(DataError, match=r"f.txt: 0 of 2 texts left after filter 'script=Deva"):
        filter_script(["hello", "world"], "Deva", "f.txt")


def test_parallel_keeps_pairs(tmp_path):
    (tmp_path / "a.txt").write_text("a1\n\na3\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("b1\nb2\nb3\n", encoding="utf-8")
    assert read_parallel([tmp_path / "a.txt", tmp_path / "b.txt"]) == [("a1", "b1"), ("a3", "b3")]
    (tmp_path / "c.txt").write_text("c1\n", encoding="utf-8")
    with pytest.raises(DataError, match="not line-aligned"):
        read_parallel([tmp_path / "a.txt", tmp_path / "c.txt"])


def test_split_prompt_and_sample():
    assert split_prompt("a b c d e f") == ("a b c", "d e f")
    assert split_prompt("a b") == ("a b", "")
    assert sample(list(range(10)), 3, seed=1) == sample(list(range(10)), 3, seed=1)
    assert len(sample(list(range(10)), 3, seed=1)) == 3
    assert list(batched([1, 2, 3], 2)) == [[1, 2], [3]]
    with pytest.raises(ValueError):
        list(batched([1], 0))


def test_sample_set_is_complete_and_aligned():
    names = ["en", "hi", "ur", "pa", "bn", "hi_latn"]
    rows = read_parallel([SAMPLE / f"{n}.jsonl" for n in names])
    assert len(rows) >= 200
    assert len(read_texts(SAMPLE / "hi_en_mixed.jsonl")) >= 100
    assert len(read_texts(SAMPLE / "adversarial_hi.jsonl")) >= 50
    for name in names + ["hi_en_mixed", "adversarial_hi"]:
        for line in (SAMPLE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            assert set(json.loads(line)) == {"text"}
