"""Structured output (decodekit.constraints): outputs validate with ``jsonschema``, every
lossless strategy equals constrained greedy, speculative sampling has constrained sampling's
law, beam equals transformers' beam search under the same mask, bad input is refused."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from decodekit import DecodeKitError, generate
from decodekit.api import build_request
from decodekit.constraints import ConstraintSpec, GrammarConstraint
from decodekit.serve.mixed import RowProcessors

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

# Bounded schemas: a random tiny model finishes them (strings and arrays have limits).
NAME = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
                                                                                      "maximum": 99}},
                                               "required": ["id"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"enum": ["red", "green", "blue"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]{2}$"},
    {"type": "object", "properties": {"a": NAME, "b": {"type": "integer", "minimum": -5, "maximum": 5}},
     "required": ["a"], "additionalProperties": False},  # optional field
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 2, "maxItems": 2},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "maxItems": 2},
                                      "kind": {"const": "note"}},
     "required": ["tags", "kind"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 50}, {"type": "null"}]},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"q": {"type": "array",
                                            "items": {"type": "boolean"}, "maxItems": 2}},
                                            "required": ["q"], "additionalProperties": False}},
     "required": ["p"], "additionalProperties": False},
]
PROMPTS = ["Give me JSON.", "A person:", "hi", "Data please, as JSON with fields."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from decodekit.models import load_model

    return load_model(str(tiny_model_dir), dtype="float32")


def _rows(tok, prompts):
    return [tok.encode(p) for p in prompts]


def _run(model, tok, rows, n=80, **kw):
    return generate(model, rows, max_new_tokens=n, tokenizer=tok, **kw)


def _validate(out, tok, schema):
    for seq, stats in zip(out.sequences, out.stats):
        assert stats.finish_reason == "eos", (tok.decode(seq), stats.finish_reason)
        jsonschema.validate(json.loads(tok.decode(seq, skip_special_tokens=True)), schema)


# ---------------------------------------------------------------------------- validity
@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_every_output_validates_greedy_and_sampled_batch_1_and_4(tiny, index):
    model, tok = tiny
    schema = SCHEMAS[index]
    for rows in (_rows(tok, PROMPTS[:1]), _rows(tok, PROMPTS)):
        _validate(_run(model, tok, rows, json_schema=schema), tok, schema)
        _validate(_run(model, tok, rows, strategy="sample", temperature=1.0, seed=index, json_schema=schema),
                  tok, schema)


def test_regex_choices_grammar_and_json_object(tiny):
    import re

    model, tok = tiny
    rows = _rows(tok, PROMPTS)
    for text in _run(model, tok, rows, regex=r"[a-c]{3}-\d").texts(tok):
        assert re.fullmatch(r"[a-c]{3}-\d", text), text
    for text in _run(model, tok, rows, strategy="sample", seed=1, choices=["yes", "no", "maybe"]).texts(tok):
        assert text in ("yes", "no", "maybe")
    lark = 'start: "(" NUM ("+" NUM)? ")"\nNUM: /[0-9]/'
    for text in _run(model, tok, rows, grammar=lark).texts(tok):
        assert re.fullmatch(r"\(\d(\+\d)?\)", text), text
    for text in _run(model, tok, rows, grammar='root ::= "a" | "bb"').texts(tok):  # GBNF
        assert text in ("a", "bb")


def test_length_finish_when_the_grammar_cannot_finish(tiny):
    model, tok = tiny
    out = _run(model, tok, _rows(tok, PROMPTS[:2]), n=5, json_schema={"type": "string", "minLength": 40})
    assert [s.finish_reason for s in out.stats] == ["length", "length"]
    assert all(len(s) == 5 for s in out.sequences)


def test_stats_report_mask_time_and_forced_tokens(tiny):
    model, tok = tiny
    out = _run(model, tok, _rows(tok, PROMPTS[:2]), json_schema=SCHEMAS[0])
    for stats in out.stats:
        d = stats.to_dict()
        assert d["mask_seconds"] > 0 and d["forced_tokens"] >= 3  # '{"', 'name', '":' at least
        assert d["forced_tokens"] < d["new_tokens"]
    assert "forced_tokens" not in _run(model, tok, _rows(tok, PROMPTS[:1]), n=3).stats[0].to_dict()


# ---------------------------------------------------------------------------- lossless
LOSSLESS = {
    "prompt_lookup": dict(strategy="prompt_lookup", draft_policy="fixed"),
    "ngram": dict(strategy="ngram", draft_policy="fixed"),
    "speculative": dict(strategy="speculative", drafter="layers:1", gamma=3, draft_policy="fixed"),
    "hybrid": dict(strategy="speculative", drafter="layers:1+prompt_lookup", gamma=3, draft_policy="fixed"),
    "jacobi": dict(strategy="jacobi"),
}


@pytest.mark.parametrize("name", list(LOSSLESS))
def test_lossless_strategies_equal_constrained_greedy(tiny, name):
    model, tok = tiny
    schema = SCHEMAS[0]
    for rows in (_rows(tok, PROMPTS[:1]), _rows(tok, PROMPTS)):
        want = _run(model, tok, rows, json_schema=schema).sequences
        assert _run(model, tok, rows, json_schema=schema, **LOSSLESS[name]).sequences == want, name


@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_prompt_lookup_drafts_the_forced_tokens(tiny, policy):
    """Tokens the schema allows alone are drafted and always accepted: fewer forwards, same output."""
    model, tok = tiny
    rows = _rows(tok, PROMPTS)
    greedy = _run(model, tok, rows, json_schema=SCHEMAS[8])
    lookup = _run(model, tok, rows, json_schema=SCHEMAS[8], strategy="prompt_lookup", draft_policy=policy)
    assert lookup.sequences == greedy.sequences
    for fast, slow in zip(lookup.stats, greedy.stats):
        assert fast.forward_passes < slow.forward_passes and fast.accepted >= fast.forced_tokens // 2
    sampled = _run(model, tok, rows, json_schema=SCHEMAS[8], strategy="prompt_lookup", draft_policy=policy,
                   temperature=1.0, seed=5)
    _validate(sampled, tok, SCHEMAS[8])


@pytest.mark.parametrize("name", ["prompt_lookup", "ngram", "speculative"])
def test_mixed_rows_constrained_and_free_in_one_batch(tiny, name):
    """Rows with a schema, a regex and none side by side, each row its own processor, as a
    serving lane batches requests (``RowProcessors``, which the drafting loop keeps in step)."""
    model, tok = tiny
    rows = _rows(tok, PROMPTS)
    kinds = [dict(json_schema=SCHEMAS[0]), {}, dict(regex="[0-9]{4}"), {}]
    want = [_run(model, tok, [row], n=30, **k).sequences[0] for row, k in zip(rows, kinds)]
    options = dict(LOSSLESS[name])
    strategy = options.pop("strategy")
    chosen, opts, req = build_request(model, rows, strategy=strategy, max_new_tokens=30, tokenizer=tok, **options)
    procs = [build_request(model, [row], max_new_tokens=30, tokenizer=tok, **k)[2].processor
             for row, k in zip(rows, kinds)]
    req.processor = RowProcessors(procs)
    assert chosen.decode(req, opts).sequences == want


PER_PROMPT = dict(json_schema=[SCHEMAS[0], None, None, SCHEMAS[4]], regex=[None, None, "[0-9]{4}", None])


@pytest.mark.parametrize("name", ["greedy", *[k for k in LOSSLESS if k != "jacobi"]])
def test_per_prompt_constraints_through_generate(tiny, name):
    """generate(json_schema=[...], regex=[...]): one constraint per prompt, None for free rows;
    each row equals that prompt decoded alone with its own constraint, rows finishing apart."""
    model, tok = tiny
    rows = _rows(tok, PROMPTS)
    alone = [dict(json_schema=SCHEMAS[0]), {}, dict(regex="[0-9]{4}"), dict(json_schema=SCHEMAS[4])]
    want = [_run(model, tok, [row], n=30, **k).sequences[0] for row, k in zip(rows, alone)]
    options = {k: v for k, v in LOSSLESS.get(name, {"strategy": "greedy"}).items()}
    out = _run(model, tok, rows, n=30, **options, **PER_PROMPT)
    assert out.sequences == want
    assert out.stats[3].forced_tokens > 0 and "forced_tokens" not in out.stats[1].to_dict()


def test_per_prompt_constraints_sampled_with_copies_and_bad_lists(tiny):
    model, tok = tiny
    rows = _rows(tok, PROMPTS)
    out = _run(model, tok, rows, strategy="sample", seed=0, num_return_sequences=2, **PER_PROMPT)
    for i in (0, 1):
        jsonschema.validate(json.loads(tok.decode(out.sequences[i], skip_special_tokens=True)), SCHEMAS[0])
    assert all(len(tok.decode(out.sequences[i], skip_special_tokens=True)) == 4 for i in (4, 5))
    with pytest.raises(DecodeKitError, match="has 2 entries for 4 prompts"):
        _run(model, tok, rows, json_schema=[SCHEMAS[0], None])
    with pytest.raises(DecodeKitError, match="prompt 1: regex is invalid"):
        _run(model, tok, rows, regex=["a", "(", None, None])
    with pytest.raises(DecodeKitError, match="per-prompt json_schema runs with strategies"):
        _run(model, tok, rows, strategy="beam", json_schema=[SCHEMAS[0]] * 4)


def _law(model, prompt, constraint, vocab, depth=6):
    """Exact law of constrained sampling at temperature 1 over whole outputs, by enumeration
    (``constraint`` is called with each prefix's history; EOS ends a sequence)."""
    eos, law, stack = model.generation_config.eos_token_id, {}, [((), 1.0)]
    while stack:
        seq, mass = stack.pop()
        ids = torch.tensor([prompt + list(seq)])
        with torch.no_grad():
            logits = model(ids).logits[:, -1].float()
        probs = torch.softmax(constraint(ids, logits, torch.tensor([len(prompt)]))[0], -1)
        for token in probs.nonzero().flatten().tolist():
            if token == eos or len(seq) + 1 == depth:
                law[seq + (token,)] = law.get(seq + (token,), 0.0) + mass * float(probs[token])
            else:
                stack.append((seq + (token,), mass * float(probs[token])))
    return law


def test_constrained_speculative_sampling_has_constrained_samplings_law(tiny_model_dir, bundled_tokenizer):
    """Masked target and masked drafter differ; the law of whole outputs must not."""
    tok = bundled_tokenizer
    target = tiny_llama(seed=11, layers=2, vocab=len(tok))
    drafter = tiny_llama(seed=12, layers=1, vocab=len(tok))
    for model in (target, drafter):
        model.generation_config.eos_token_id = tok.eos_token_id
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)  # peaked, and different between the two
    regex, prompt = "[ab]{1,2}", tok.encode("pick:")
    spec = ConstraintSpec.from_options(regex=regex)
    law = _law(target, prompt, GrammarConstraint(spec, tok, [tok.eos_token_id], len(tok)), len(tok))
    n, seqs, drafted, accepted = 1500, [], 0, 0
    for chunk in range(3):
        out = _run(target, tok, [prompt] * (n // 3), n=3, strategy="speculative", drafter=drafter, gamma=2,
                   draft_policy="fixed", temperature=1.0, seed=chunk, regex=regex)
        seqs += [tuple(s) for s in out.sequences]
        drafted += sum(s.drafted for s in out.stats)
        accepted += sum(s.accepted for s in out.stats)
    assert 0.05 < accepted / drafted < 0.95  # both branches of the verifier exercised
    freq = {s: seqs.count(s) / n for s in set(seqs)}
    assert set(freq) <= set(law)
    tv = 0.5 * sum(abs(freq.get(s, 0.0) - p) for s, p in law.items())
    # E[TV] over <= 10 outcomes with 1500 samples is <= 0.5 * sqrt(10 / 1500) ~ 0.04
    assert tv < 0.09, (tv, law, freq)


def test_beam_equals_transformers_beam_search_under_the_same_mask(tiny):
    """Batch 1 and 2 (ragged prompts, left padded for transformers): every beam has its own
    matcher state, and transformers' beam search with the same mask as a logits processor
    (it sees each beam's sequence) picks the same sequences."""
    model, tok = tiny
    schema = SCHEMAS[2]
    mask = GrammarConstraint(ConstraintSpec.from_options(json_schema=schema), tok, [tok.eos_token_id], len(tok))
    for rows in (_rows(tok, PROMPTS[1:2]), _rows(tok, PROMPTS[:2])):
        out = _run(model, tok, rows, n=20, strategy="beam", num_beams=3, json_schema=schema)
        width = max(len(r) for r in rows)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        ref = model.generate(ids, attention_mask=attention, num_beams=3, do_sample=False, max_new_tokens=20,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             logits_processor=[lambda i, scores, start=width: mask(i, scores, start)])
        for got, want in zip(out.sequences, ref[:, width:].tolist()):
            want = want[: want.index(tok.eos_token_id) + 1] if tok.eos_token_id in want else want
            assert got == want
        _validate(out, tok, schema)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("given,match", [
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(json_schema={"type": "strin"}), "json_schema is invalid: .*strin"),
    (dict(json_schema={"$ref": "#/nowhere"}), "json_schema is invalid"),
    (dict(json_schema={"type": "array", "uniqueItems": True}), "json_schema is invalid: .*uniqueItems"),
    (dict(regex="a(b"), "regex is invalid: .*unclosed group"),
    (dict(grammar="start: foo"), "grammar is invalid: .*foo"),
    (dict(choices=[]), "choices must be a non-empty list"),
    (dict(choices="yes"), "choices must be a non-empty list"),
    (dict(json_object="yes"), "json_object must be True"),
    (dict(regex="a", choices=["a"]), "give one constraint"),
])
def test_bad_constraints_are_one_line_errors_naming_the_field(given, match):
    with pytest.raises(DecodeKitError, match=match) as info:
        ConstraintSpec.from_options(**given)
    assert "\n" not in str(info.value)


def test_generate_refuses_what_it_cannot_constrain(tiny):
    model, tok = tiny
    with pytest.raises(DecodeKitError, match="json_schema needs tokenizer"):
        generate(model, [[5, 6]], json_schema=SCHEMAS[0])
    with pytest.raises(DecodeKitError, match="'eis' does not take regex"):
        generate(model, [[5, 6]], strategy="eis", tokenizer=tok, regex="a")
    with pytest.raises(DecodeKitError, match="'refine' does not take choices"):
        generate(model, [[5, 6]], strategy="refine", tokenizer=tok, choices=["a"])
    with pytest.raises(DecodeKitError, match="regex is invalid"):
        generate(model, [[5, 6]], tokenizer=tok, regex="(")
    for knob in (dict(min_new_tokens=3), dict(ignore_eos=True)):
        with pytest.raises(DecodeKitError, match=f"{next(iter(knob))} cannot be combined with choices"):
            generate(model, [[5, 6]], tokenizer=tok, choices=["a"], **knob)


# ---------------------------------------------------------------------------- bundled model
REAL_SCHEMAS = [  # closed objects: an open one lets the model add properties until the length limit
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                      "population": {"type": "number", "minimum": 0},
                                      "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                               "maxItems": 3}},
     "required": ["city", "code"], "additionalProperties": False},
]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(REAL_SCHEMAS)))
def test_bundled_model_outputs_validate_and_drafting_is_exact(real_model, index):
    from conftest import CHAT_PROMPTS, chat_batch

    model, tok = real_model
    schema = REAL_SCHEMAS[index]
    ids, mask = chat_batch(tok, [p + " Answer in JSON." for p in CHAT_PROMPTS[:4]])
    greedy = generate(model, ids, mask, max_new_tokens=80, tokenizer=tok, json_schema=schema)
    _validate(greedy, tok, schema)
    sampled = generate(model, ids, mask, strategy="sample", temperature=0.7, seed=0, max_new_tokens=80,
                       tokenizer=tok, json_schema=schema)
    _validate(sampled, tok, schema)
    drafters = [[dict(strategy="prompt_lookup"), dict(strategy="speculative", drafter="eagle", gamma=3)],
                [dict(strategy="speculative", drafter="eagle+prompt_lookup", gamma=3)]][index]
    for drafting in drafters:
        out = generate(model, ids, mask, draft_policy="fixed", max_new_tokens=80, tokenizer=tok, json_schema=schema,
                       **drafting)
        assert out.sequences == greedy.sequences, drafting


# ---------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv,match", [
    (["--regex", "a("], "regex is invalid"),
    (["--json_schema", "{\"type\": 3}"], "json_schema is invalid"),
    (["--choices", "a", "--regex", "b"], "give one constraint"),
    (["--strategy", "eis", "--json_object"], "'eis' does not take --json_object"),
    (["--json_object", "--min_new_tokens", "4"], "--min_new_tokens cannot be combined with --json_object"),
])
def test_cli_bad_constraint_exits_2_before_the_model_loads(capsys, monkeypatch, argv, match):
    import decodekit.models
    from decodekit.cli import main

    monkeypatch.setattr(decodekit.models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["generate", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_cli_json_schema_file_and_choices(tiny_model_dir, tmp_path, capsys):
    from decodekit.cli import main

    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS[0]))
    prompts, out = tmp_path / "p.txt", tmp_path / "out.jsonl"
    prompts.write_text("A person:\nAnother one:\n")
    base = ["generate", "--model_path", str(tiny_model_dir), "--prompts_file", str(prompts), "--device", "cpu",
            "--max_new_tokens", "60", "--no_chat_template"]
    assert main([*base, "--json_schema", str(schema_file), "--output_file", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        jsonschema.validate(json.loads(record["response"]), SCHEMAS[0])
    assert main([*base, "--choices", "yes", "--choices", "no", "--output_file", str(out), "--overwrite"]) == 0
    assert {json.loads(line)["response"] for line in out.read_text().splitlines()} <= {"yes", "no"}


def test_logprobs_leave_out_what_the_constraint_forbids(tiny):
    model, tok = tiny
    out = _run(model, tok, _rows(tok, PROMPTS[:1]), logprobs=5, choices=["yes", "no"])
    for entry in out.logprobs[0]:
        assert 1 <= len(entry["top_logprobs"]) <= 5
        assert all(alt["logprob"] > -float("inf") for alt in entry["top_logprobs"])


def test_cli_prompts_file_with_a_schema_per_prompt(tiny_model_dir, tmp_path, capsys):
    from decodekit.cli import main

    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    entries = [{"prompt": "A person:", "json_schema": SCHEMAS[0]}, {"prompt": "Colour?"},
               {"prompt": "Another person:", "json_schema": SCHEMAS[0]}, {"prompt": "Ok?", "json_schema": SCHEMAS[4]}]
    prompts.write_text("".join(json.dumps(e) + "\n" for e in entries))
    argv = ["generate", "--model_path", str(tiny_model_dir), "--prompts_file", str(prompts), "--device", "cpu",
            "--max_new_tokens", "60", "--no_chat_template", "--choices", "red", "--choices", "blue",
            "--output_file", str(out)]
    assert main(argv) == 0
    records = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"])
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    for record, entry in zip(records, entries):
        if "json_schema" in entry:
            jsonschema.validate(json.loads(record["response"]), entry["json_schema"])
        else:
            assert record["response"] in ("red", "blue")  # the command line's constraint
    prompts.write_text(json.dumps({"prompt": "x", "json_schema": {"type": "strin"}}) + "\n")
    assert main(argv + ["--overwrite"]) == 2
    assert "prompts_file prompt 0: json_schema is invalid" in capsys.readouterr().err
