import json

import pytest

from decodekit.io import ResultWriter, load_prompts, make_record
from decodekit.validation import DecodeKitError


def test_load_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n two \nthree\n")
    assert load_prompts(prompts_file=str(tmp_path / "p.txt")) == ["one", " two ", "three"]
    (tmp_path / "p.json").write_text(json.dumps(["a", {"prompt": "b"}]))
    assert load_prompts(prompts_file=str(tmp_path / "p.json")) == ["a", "b"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n\n{"prompt": "y", "id": 2}\n')
    assert load_prompts(prompts_file=str(tmp_path / "p.jsonl")) == ["x", "y"]
    assert load_prompts(prompt="hello") == ["hello"]


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("bad.jsonl", '{"prompt": "x"}\n{"nope": 1}\n', "line 2"),
        ("bad2.jsonl", '{"prompt": "x"}\n\n{oops\n', "line 3"),
        ("bad.json", '{"prompt": "x"}', "list"),
        ("empty.txt", "\n\n", "no prompts"),
        ("blank.jsonl", '{"prompt": "  "}\n', "line 1: empty"),
        ("x.csv", "a,b", ".txt, .json or .jsonl"),
    ],
)
def test_load_prompts_errors_name_the_line(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DecodeKitError, match=match):
        load_prompts(prompts_file=str(tmp_path / name))


def test_prompt_xor_file():
    with pytest.raises(DecodeKitError, match="exactly one"):
        load_prompts()
    with pytest.raises(DecodeKitError, match="exactly one"):
        load_prompts("a", "b.txt")
    with pytest.raises(DecodeKitError, match="empty"):
        load_prompts(prompt="  ")
    with pytest.raises(DecodeKitError, match="cannot be read"):
        load_prompts(prompts_file="/nonexistent/p.txt")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_writer_appends_per_batch_and_resumes(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    w = ResultWriter(path)
    w.write([{"prompt": "a", "response": "1"}])
    w.write([{"prompt": "b", "response": "2"}])
    if suffix == ".jsonl":  # an interrupted write leaves a cut line: it is dropped on resume
        with path.open("a") as fh:
            fh.write('{"prompt": "c", "resp')
    resumed = ResultWriter(path, resume=True)
    assert resumed.done == {"a", "b"}
    resumed.write([{"prompt": "c", "response": "3"}])
    if suffix == ".json":
        data = json.loads(path.read_text())
    else:
        data = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt"] for r in data] == ["a", "b", "c"]
    fresh = ResultWriter(path)  # without resume the file starts over
    assert fresh.done == set() and not path.exists()


def test_make_record_fields():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(96 + i) for i in ids if not (skip_special_tokens and i == 0))

    rec = make_record("p", [1, 2], [3, 0], Tok(), stats={"new_tokens": 2})
    assert rec["response"] == "c" and rec["full_text"] == "abc" + chr(96)
    assert (rec["prompt_length"], rec["response_length"], rec["total_length"]) == (2, 2, 4)
    assert rec["response_token_ids"] == [3, 0] and rec["stats"] == {"new_tokens": 2}
