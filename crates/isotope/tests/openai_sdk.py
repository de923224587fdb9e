"""Drive a running `isotope serve` with the official `openai` Python SDK.

Called by crates/isotope/tests/serve.rs with the server's base URL and API keys.
Every check is an assert; on success it prints one JSON object (the generated texts,
for the Rust side to run watermark detection on) on stdout.
"""

import argparse
import json
import sys
import time

import urllib.error
import urllib.request
import openai
from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--base-url", required=True)
ap.add_argument("--key", required=True)
ap.add_argument("--limited-key", required=True, help="a key with requests_per_minute=2")
ap.add_argument("--model", required=True)
args = ap.parse_args()

client = OpenAI(base_url=args.base_url, api_key=args.key, max_retries=0, timeout=120)
root = args.base_url.rsplit("/v1", 1)[0]
texts = []
checks = []


def http(method, url, body=None, headers=None):
    """(status, parsed JSON or text) with the standard library only."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def check(name):
    checks.append(name)
    print(f"ok: {name}", file=sys.stderr)


# --- models -------------------------------------------------------------------------
models = client.models.list()
assert [m.id for m in models.data] == [args.model], models
check("models.list")

# --- chat, non-streaming vs streaming at temperature 0.8 -----------------------------
messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
kw = dict(model=args.model, messages=messages, temperature=0.8, top_p=0.95, seed=1234, max_tokens=160)
whole = client.chat.completions.create(**kw)
assert whole.object == "chat.completion"
c0 = whole.choices[0]
assert c0.message.role == "assistant" and c0.message.content, whole
assert c0.finish_reason in ("stop", "length")
u = whole.usage
assert u.prompt_tokens > 0 and u.completion_tokens > 0
assert u.total_tokens == u.prompt_tokens + u.completion_tokens
texts.append(c0.message.content)
check("chat non-stream")

stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
pieces, finish, usage_chunks, roles = [], None, [], 0
for chunk in stream:
    assert chunk.object == "chat.completion.chunk"
    if chunk.usage is not None:
        usage_chunks.append(chunk)
        assert chunk.choices == [], "the usage chunk has no choices"
        continue
    for ch in chunk.choices:
        if ch.delta.role:
            roles += 1
        if ch.delta.content:
            pieces.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
streamed = "".join(pieces)
assert streamed == c0.message.content, (streamed, c0.message.content)
assert finish == c0.finish_reason
assert roles == 1
assert len(usage_chunks) == 1 and usage_chunks[0].usage.completion_tokens == u.completion_tokens
check("chat stream == non-stream at T=0.8 with the same seed; include_usage")

# --- logprobs ---------------------------------------------------------------------------
lp = client.chat.completions.create(
    model=args.model, messages=messages, temperature=0.8, seed=7, max_tokens=24,
    logprobs=True, top_logprobs=5,
)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens
for t in content:
    assert t.logprob <= 0.0
    assert len(t.top_logprobs) == 5
    assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
    assert bytes(t.bytes).decode("utf-8", "replace") == t.token or t.bytes
assert "".join(t.token for t in content).strip() != ""
check("chat logprobs/top_logprobs")

# --- n > 1 --------------------------------------------------------------------------------
multi = client.chat.completions.create(
    model=args.model, messages=messages, temperature=1.0, seed=99, max_tokens=40, n=3
)
assert [c.index for c in multi.choices] == [0, 1, 2]
assert len({c.message.content for c in multi.choices}) > 1, "n=3 choices should differ"
check("n=3")

# --- completions --------------------------------------------------------------------------
comp = client.completions.create(
    model=args.model, prompt="The three primary colours are", max_tokens=20, temperature=0.8,
    seed=3, logprobs=3,
)
assert comp.object == "text_completion"
ch = comp.choices[0]
assert ch.text
lpo = ch.logprobs
assert len(lpo.tokens) == len(lpo.token_logprobs) == len(lpo.top_logprobs) == len(lpo.text_offset)
assert len(lpo.tokens) == comp.usage.completion_tokens
assert all(len(d) <= 3 for d in lpo.top_logprobs)
assert lpo.text_offset == sorted(lpo.text_offset)
cstream = client.completions.create(
    model=args.model, prompt="The three primary colours are", max_tokens=20, temperature=0.8,
    seed=3, stream=True,
)
assert "".join(c.choices[0].text for c in cstream if c.choices) == ch.text
check("completions (+stream, logprobs shape)")

# batched prompts: choice i answers prompt i // n, as OpenAI numbers them; usage adds
# up the prompts; the stream carries the same four texts.
batch = client.completions.create(
    model=args.model, prompt=["The three primary colours are", "Once upon a time"],
    max_tokens=20, temperature=0.8, seed=3, n=2,
)
assert [c.index for c in batch.choices] == [0, 1, 2, 3], batch
assert all(c.text for c in batch.choices), batch
p1 = client.completions.create(model=args.model, prompt="The three primary colours are", max_tokens=1)
p2 = client.completions.create(model=args.model, prompt="Once upon a time", max_tokens=1)
assert batch.usage.prompt_tokens == p1.usage.prompt_tokens + p2.usage.prompt_tokens, batch.usage
bstream = client.completions.create(
    model=args.model, prompt=["The three primary colours are", "Once upon a time"],
    max_tokens=20, temperature=0.8, seed=3, n=2, stream=True,
)
streamed = {}
for chunk in bstream:
    for c in chunk.choices:
        streamed[c.index] = streamed.get(c.index, "") + c.text
assert [streamed[i] for i in range(4)] == [c.text for c in batch.choices], streamed
check("batched prompts (+stream)")

# echo with logprobs is refused by default policy
try:
    client.completions.create(model=args.model, prompt="Hello", max_tokens=2, echo=True, logprobs=1)
    raise AssertionError("echo+logprobs should be refused")
except openai.BadRequestError as e:
    assert e.body["param"] == "echo", e.body
check("echo+logprobs refused by policy")

# --- errors -------------------------------------------------------------------------------
bad = OpenAI(base_url=args.base_url, api_key="isk_wrong_key", max_retries=0)
try:
    bad.chat.completions.create(model=args.model, messages=messages, max_tokens=2)
    raise AssertionError("a wrong key must be refused")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.body["code"] == "invalid_api_key", e.body
check("401 on a wrong key")

try:
    client.chat.completions.create(model="gpt-nope", messages=messages, max_tokens=2)
    raise AssertionError("unknown model")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
try:
    client.chat.completions.create(model=args.model, messages=[], max_tokens=2)
    raise AssertionError("empty messages")
except openai.BadRequestError as e:
    assert e.body["param"] == "messages", e.body
try:
    client.chat.completions.create(model=args.model, messages=messages, max_tokens=10_000_000)
    raise AssertionError("huge max_tokens")
except openai.BadRequestError as e:
    assert e.body["code"] == "context_length_exceeded", e.body
try:
    client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "word " * 5000}], max_tokens=8
    )
    raise AssertionError("prompt over context")
except openai.BadRequestError as e:
    assert e.body["code"] == "context_length_exceeded", e.body
check("404 unknown model, 400 empty messages / huge max_tokens / prompt over context")

h = {"Authorization": f"Bearer {args.key}", "content-type": "application/json"}
url = f"{args.base_url}/chat/completions"
st, body = http("POST", url, b'{"model": ', h)
assert st == 400 and "error" in body, (st, body)
st, body = http("POST", url, json.dumps({"model": args.model, "messages": messages, "temperature": "hot"}).encode(), h)
assert st == 400 and body["error"]["param"] == "temperature", (st, body)
st, body = http("POST", url, json.dumps({"model": args.model, "messages": messages, "max_tokens": 4, "n": "two"}).encode(), h)
assert st == 400 and "error" in body, (st, body)
try:
    st, body = http("POST", url, b"x" * (5 << 20), h)
    assert st == 413 and "error" in body, (st, body)
except (ConnectionError, urllib.error.URLError):
    pass  # the server may close the connection before reading the whole body
st, body = http("GET", f"{args.base_url}/nope", None, h)
assert st == 404 and "error" in body, (st, body)
check("malformed JSON / wrong types -> 400 JSON, body too large -> 413, unknown route -> 404")

# The server keeps serving after all that.
again = client.chat.completions.create(model=args.model, messages=messages, max_tokens=4, temperature=0)
assert again.choices[0].message.content
check("still serving after bad input")

# --- client disconnect mid-stream frees the sequence ---------------------------------------
s = client.chat.completions.create(
    model=args.model, messages=messages, temperature=0.9, max_tokens=400, stream=True
)
got = 0
for chunk in s:
    got += 1
    if got >= 5:
        break
s.close()
deadline = time.time() + 20
active = None
while time.time() < deadline:
    active = http("GET", f"{root}/health")[1]["active_sequences"]
    if active == 0:
        break
    time.sleep(0.2)
assert active == 0, f"sequence not freed after disconnect: {active} active"
check("disconnect mid-stream frees the sequence")

# --- rate limit -------------------------------------------------------------------------------
limited = OpenAI(base_url=args.base_url, api_key=args.limited_key, max_retries=0)
raw = limited.chat.completions.with_raw_response.create(model=args.model, messages=messages, max_tokens=2)
assert raw.headers["x-ratelimit-limit-requests"] == "2", dict(raw.headers)
assert raw.headers["x-ratelimit-remaining-requests"] == "1", dict(raw.headers)
limited.chat.completions.create(model=args.model, messages=messages, max_tokens=2)
try:
    limited.chat.completions.create(model=args.model, messages=messages, max_tokens=2)
    raise AssertionError("third request in a minute must be rate limited")
except openai.RateLimitError as e:
    assert e.status_code == 429 and e.body["code"] == "rate_limit_exceeded", e.body
    assert int(e.response.headers["retry-after"]) >= 1
check("429 on the rate-limited key, x-ratelimit headers")

metrics = http("GET", f"{root}/metrics")[1]
assert "isotope_http_requests_total" in metrics and "isotope_generated_tokens_total" in metrics
check("/metrics")

print(json.dumps({"texts": texts + [m.message.content for m in multi.choices], "checks": checks}))
