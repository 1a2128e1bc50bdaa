"""Drives a running `flashmoe serve` with the official `openai` Python package.

Environment: OPENAI_BASE_URL (http://HOST:PORT/v1), OPENAI_API_KEY, FLASHMOE_MODEL.
Started by crates/cli/tests/serve.rs (`openai_python_client`); prints `N passed, M failed`.
"""
import json
import os

import openai
from openai import OpenAI

from runner import run_tests

MODEL = os.environ.get("FLASHMOE_MODEL", "tiny-a")
client = OpenAI(timeout=120, max_retries=0)

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}]


def messages(user):
    return [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": user},
    ]


def test_models():
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL], ids


def test_chat_non_streaming():
    r = client.chat.completions.create(model=MODEL, messages=messages("Hi"), max_tokens=8)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
    u = r.usage
    assert u.prompt_tokens > 0 and 1 <= u.completion_tokens <= 8, u
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens is not None


def test_chat_streaming_with_usage():
    stream = client.chat.completions.create(
        model=MODEL, messages=messages("Hi"), max_tokens=8, stream=True,
        stream_options={"include_usage": True},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length"), finishes
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_tools_round_trip_and_cache():
    convo = messages("Weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    first = client.chat.completions.create(model=MODEL, messages=convo, tools=TOOLS, max_tokens=4)
    again = client.chat.completions.create(model=MODEL, messages=convo, tools=TOOLS, max_tokens=4)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens, again.usage
    msg = first.choices[0].message
    for call in msg.tool_calls or []:
        assert call.id.startswith("call_") and isinstance(json.loads(call.function.arguments), dict)
    forced = client.chat.completions.create(
        model=MODEL, messages=messages("Weather?"), tools=TOOLS, max_tokens=4,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert forced.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(
        model=MODEL, messages=messages("Weather?"), tools=TOOLS, max_tokens=4, tool_choice="none")
    assert none.usage.prompt_tokens < first.usage.prompt_tokens


def test_completions():
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    parts = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=4, stream=True))
    assert parts and parts[-1].choices[0].finish_reason in ("stop", "length")


def test_errors():
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
        raise AssertionError("unknown role accepted")
    except openai.BadRequestError as e:
        assert "role" in str(e), e
    try:
        client.chat.completions.create(model="no-such-model", messages=messages("x"))
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError:
        pass
    try:
        client.chat.completions.create(model=MODEL, messages=messages("x"), max_tokens=10**6)
        raise AssertionError("max_tokens beyond the context accepted")
    except openai.BadRequestError:
        pass
    bad_key = OpenAI(api_key="wrong", timeout=30, max_retries=0)
    try:
        bad_key.models.list()
        raise AssertionError("wrong API key accepted")
    except openai.AuthenticationError:
        pass


if __name__ == "__main__":
    run_tests(globals())
