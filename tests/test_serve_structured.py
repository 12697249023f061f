"""Structured output through ``decodekit serve`` with the official ``openai`` client: OpenAI's
``response_format`` (json_schema, json_object) and vLLM's ``guided_*`` fields, streamed and not,
concurrent requests with different schemas in one batch, equal to offline ``generate``."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import test_serve_app  # noqa: E402
from test_serve_app import chat, offline  # noqa: E402

server, client = test_serve_app.server, test_serve_app.client  # the module's fixtures: one server

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "country": {"enum": ["France", "Spain", "Italy", "Other"]}},
        "required": ["city", "country"], "additionalProperties": False}


def _schema_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_response_format_json_schema_streamed_and_not(client, real_model):
    prompt = "Describe a person in JSON."
    expected = offline(real_model, prompt, max_new_tokens=40, json_schema=PERSON)
    reply = chat(client, prompt, max_tokens=40, response_format=_schema_format(PERSON))
    text = reply.choices[0].message.content
    assert text == expected and reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    stats = reply.model_extra["decoding_stats"]
    assert stats["forced_tokens"] >= 3 and stats["mask_seconds"] > 0
    stream = chat(client, prompt, max_tokens=40, response_format=_schema_format(PERSON), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_concurrent_requests_with_different_constraints_share_the_batch(client, real_model):
    jobs = [("A person in JSON:", dict(response_format=_schema_format(PERSON))),
            ("Where is Paris? JSON:", dict(response_format=_schema_format(CITY))),
            ("Is water wet?", dict(extra_body={"guided_choice": ["yes", "no"]})),
            ("Say hi.", {}),
            ("A year:", dict(extra_body={"guided_regex": "(19|20)[0-9]{2}"})),
            ("Any JSON object:", dict(response_format={"type": "json_object"}))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: chat(client, job[0], max_tokens=40, **job[1]), jobs))
    texts = [r.choices[0].message.content for r in replies]
    jsonschema.validate(json.loads(texts[0]), PERSON)
    jsonschema.validate(json.loads(texts[1]), CITY)
    assert texts[2] in ("yes", "no") and len(texts[4]) == 4 and texts[4][:2] in ("19", "20")
    assert offline(real_model, jobs[1][0], max_new_tokens=40, json_schema=CITY) == texts[1]
    assert offline(real_model, jobs[3][0], max_new_tokens=40) == texts[3]


@pytest.mark.parametrize("extra,param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}),
     "response_format"),
    (dict(extra_body={"guided_regex": "a("}), "guided_regex"),
    (dict(response_format={"type": "xml"}), "response_format"),
])
def test_bad_constraints_are_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, "hi", **extra)
    assert bad.value.body["param"] == param and "\n" not in bad.value.body["message"]
