"""Drives a running `flashmoe serve` with the official `anthropic` Python package.

Environment: ANTHROPIC_BASE_URL (http://HOST:PORT), ANTHROPIC_API_KEY, FLASHMOE_MODEL.
Started by crates/cli/tests/serve_anthropic.rs (`anthropic_python_client`); prints
`N passed, M failed`.
"""
import os

import anthropic
from anthropic import Anthropic

from runner import run_tests

MODEL = os.environ.get("FLASHMOE_MODEL", "tiny-a")
# Only the key is meant: a token in the caller's environment would be sent as well.
os.environ.pop("ANTHROPIC_AUTH_TOKEN", None)
client = Anthropic(timeout=120, max_retries=0)
# Sampling fields ride in extra_body: this SDK's create() no longer takes them as arguments.
GREEDY = {"extra_body": {"temperature": 0, "top_k": 1}}

TOOLS = [{
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}]
SYSTEM = "You are a terse assistant."


def ask(user="Hi", **kw):
    args = dict(model=MODEL, max_tokens=8, system=SYSTEM,
                messages=[{"role": "user", "content": user}], **GREEDY)
    args.update(kw)
    return args


def blocks(msg):
    """The content as comparable tuples."""
    out = []
    for b in msg.content:
        if b.type == "text":
            out.append(("text", b.text))
        elif b.type == "thinking":
            out.append(("thinking", b.thinking))
        elif b.type == "tool_use":
            out.append(("tool_use", b.name, b.input))
        else:
            raise AssertionError(f"unexpected block {b}")
    return out


def test_non_streaming():
    r = client.messages.create(**ask())
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL, r
    assert r.id.startswith("msg_"), r.id
    assert r.stop_reason in ("end_turn", "max_tokens"), r.stop_reason
    u = r.usage
    assert u.input_tokens + (u.cache_read_input_tokens or 0) > 0, u
    assert 1 <= u.output_tokens <= 8, u
    assert r.content, r


def test_streaming_matches_whole_answer():
    whole = client.messages.create(**ask("Tell me about the sea"))
    with client.messages.stream(**ask("Tell me about the sea")) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    # (The helper hides `ping`; crates/cli/tests/serve_anthropic.rs checks it over raw HTTP.)
    assert "message_delta" in kinds and "content_block_delta" in kinds, kinds
    assert kinds.count("content_block_start") == kinds.count("content_block_stop"), kinds
    assert blocks(final) == blocks(whole), (blocks(final), blocks(whole))
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    # The same prompt again is a cache read in full: input plus cache reads is the prompt.
    assert (final.usage.input_tokens + final.usage.cache_read_input_tokens
            == whole.usage.input_tokens + whole.usage.cache_read_input_tokens), (final.usage, whole.usage)
    text = "".join(b.text for b in final.content if b.type == "text")
    with client.messages.stream(**ask("Tell me about the sea")) as stream:
        assert "".join(stream.text_stream) == text


def test_system_prompt_is_seen():
    short = client.messages.create(**ask(system="Be brief."))
    long = client.messages.create(**ask(system=[{"type": "text", "text": "Be brief. " * 20}]))
    size = lambda r: r.usage.input_tokens + r.usage.cache_read_input_tokens
    assert size(long) > size(short) + 20, (short.usage, long.usage)


def test_thinking_blocks():
    r = client.messages.create(**ask(max_tokens=6, thinking={"type": "enabled", "budget_tokens": 1024}))
    # The prompt opens the think block: what the model writes first is thinking.
    assert r.content and r.content[0].type == "thinking", r.content
    off = client.messages.create(**ask(max_tokens=6, thinking={"type": "disabled"}))
    size = lambda r: r.usage.input_tokens + r.usage.cache_read_input_tokens
    assert size(off) > size(r), "disabled thinking adds the closed think block to the prompt"


def test_tool_use_round_trip():
    convo = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny, 21C"},
        ]},
    ]
    first_turn = client.messages.create(model=MODEL, max_tokens=6, tools=TOOLS,
                                        messages=convo[:1], **GREEDY)
    r = client.messages.create(model=MODEL, max_tokens=6, tools=TOOLS, messages=convo, **GREEDY)
    size = lambda r: r.usage.input_tokens + r.usage.cache_read_input_tokens
    assert size(r) > size(first_turn), (r.usage, first_turn.usage)
    # The conversation's first turn was prefilled before: it is read from the cache.
    assert r.usage.cache_read_input_tokens > 0, r.usage
    counted = client.messages.count_tokens(model=MODEL, tools=TOOLS, messages=convo)
    assert counted.input_tokens == size(r), (counted, r.usage)
    forced = client.messages.create(model=MODEL, max_tokens=12, tools=TOOLS, messages=convo[:1],
                                    tool_choice={"type": "tool", "name": "get_weather"}, **GREEDY)
    assert forced.stop_reason in ("tool_use", "end_turn", "max_tokens"), forced.stop_reason
    for b in forced.content:
        if b.type == "tool_use":
            assert b.id.startswith("toolu_") and isinstance(b.input, dict), b
    assert (forced.stop_reason == "tool_use") == any(b.type == "tool_use" for b in forced.content)


def test_count_tokens_matches_usage():
    r = client.messages.create(**ask("Count me"))
    n = client.messages.count_tokens(model=MODEL, system=SYSTEM,
                                     messages=[{"role": "user", "content": "Count me"}])
    assert n.input_tokens == r.usage.input_tokens + r.usage.cache_read_input_tokens, (n, r.usage)


def test_stop_sequences():
    def said(r):
        return "".join(b.text if b.type == "text" else b.thinking for b in r.content)
    free = said(client.messages.create(**ask("Say something", max_tokens=16)))
    assert len(free) >= 2, free
    stop = free[1]
    cut = client.messages.create(**ask("Say something", max_tokens=16, stop_sequences=[stop]))
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop, cut
    assert stop not in said(cut), said(cut)


def test_errors():
    try:
        client.messages.create(**ask(model="claude-no-such-model"))
        raise AssertionError("unknown model accepted")
    except anthropic.NotFoundError as e:
        assert e.body["error"]["type"] == "not_found_error", e.body
    try:
        client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}]}])
        raise AssertionError("an image was accepted")
    except anthropic.BadRequestError as e:
        assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", e.body
        assert "messages.0.content.0.type" in e.body["error"]["message"], e.body
    try:
        client.messages.create(**ask(extra_body={"temperature": 5}))
        raise AssertionError("temperature 5 accepted")
    except anthropic.BadRequestError:
        pass
    bad_key = Anthropic(api_key="wrong", timeout=30, max_retries=0)
    try:
        bad_key.messages.create(**ask())
        raise AssertionError("wrong API key accepted")
    except anthropic.AuthenticationError as e:
        assert e.body["error"]["type"] == "authentication_error", e.body
    # Bearer auth (the SDK's auth_token) works too.
    key = os.environ.pop("ANTHROPIC_API_KEY")
    try:
        bearer = Anthropic(auth_token=key, timeout=60, max_retries=0)
        assert bearer.api_key is None
        assert bearer.messages.create(**ask()).type == "message"
    finally:
        os.environ["ANTHROPIC_API_KEY"] = key


if __name__ == "__main__":
    run_tests(globals())
