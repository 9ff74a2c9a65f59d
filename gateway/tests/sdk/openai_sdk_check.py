"""The official OpenAI Python SDK against a real jetinfer gateway.

Run by gateway/tests/openai_sdk.rs, which starts nats-server (shipped secure
config), a MiniLM worker and the gateway, and passes in the environment:
JETINFER_GATEWAY_URL, the keys (ACME_KEY, ACME_LIMITED_KEY,
ACME_READ_ONLY_KEY) and JETINFER_GOLDEN (the golden embeddings file). The SDK
is used as shipped: no patch, no custom transport. Exits non-zero on the
first failed check, naming it.
"""

import base64
import json
import math
import os
import struct
import sys

import openai

URL = os.environ["JETINFER_GATEWAY_URL"] + "/v1"
MIN_COSINE = 0.9999


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def normalised(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def check(what, ok, detail=""):
    if not ok:
        print(f"FAILED: {what} {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def expect_error(what, cls, status, call):
    try:
        call()
    except cls as err:
        check(what, err.status_code == status, f"status {err.status_code}")
        body = err.body if isinstance(err.body, dict) else {}
        check(f"{what}: OpenAI error shape", "message" in body and "type" in body, repr(err.body))
        return err
    check(what, False, "no error raised")


golden = json.load(open(os.environ["JETINFER_GOLDEN"]))
texts, reference = golden["texts"], golden["embeddings"]
client = openai.OpenAI(base_url=URL, api_key=os.environ["ACME_KEY"], max_retries=0)

# One input, the SDK's default call: it asks for base64 and decodes it.
raw = client.embeddings.with_raw_response.create(model="minilm", input=texts[12])
sent = json.loads(raw.http_request.content)
check("the SDK asked for base64 by default", sent.get("encoding_format") == "base64", repr(sent))
one = raw.parse()
check("one input: one embedding", len(one.data) == 1 and len(one.data[0].embedding) == 384)
c = cosine(one.data[0].embedding, reference[12])
check("one input matches the golden file", c >= MIN_COSINE, f"cosine {c}")
check("usage from the worker's token counts", one.usage.prompt_tokens > 0 and one.usage.total_tokens == one.usage.prompt_tokens)



def vector(embedding):
    # Asked for explicitly, base64 comes back as the string (the SDK decodes
    # only what it asked for itself): little-endian f32.
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return embedding


# Many inputs: every golden text in one request, both encodings.
for fmt in ("base64", "float"):
    many = client.embeddings.create(model="minilm", input=texts, encoding_format=fmt)
    check(f"many inputs ({fmt}): one embedding each, in order", [d.index for d in many.data] == list(range(len(texts))))
    if fmt == "base64":
        check("explicit base64 is a string", isinstance(many.data[0].embedding, str))
    worst = min(cosine(vector(d.embedding), reference[d.index]) for d in many.data)
    check(f"many inputs ({fmt}) match the golden file", worst >= MIN_COSINE, f"lowest cosine {worst}")

# dimensions: the first N values, re-normalised.
short = client.embeddings.create(model="minilm", input=texts[:8], dimensions=64)
check("dimensions=64: 64 values each", all(len(d.embedding) == 64 for d in short.data))
worst = min(cosine(d.embedding, normalised(reference[d.index][:64])) for d in short.data)
check("dimensions=64 matches the golden file truncated and re-normalised", worst >= MIN_COSINE, f"lowest cosine {worst}")
norm = math.sqrt(sum(x * x for x in short.data[0].embedding))
check("dimensions=64 is unit length", abs(norm - 1) < 1e-4, f"norm {norm}")

# Models.
listed = [m.id for m in client.models.list()]
check("models.list names the served model", listed == ["minilm"], repr(listed))
check("models.retrieve", client.models.retrieve("minilm").id == "minilm")

# Refusals.
bad = openai.OpenAI(base_url=URL, api_key="sk-not-a-key", max_retries=0)
expect_error("a bad key is 401", openai.AuthenticationError, 401, lambda: bad.embeddings.create(model="minilm", input="a"))
read_only = openai.OpenAI(base_url=URL, api_key=os.environ["ACME_READ_ONLY_KEY"], max_retries=0)
expect_error("a read-only key is 403", openai.PermissionDeniedError, 403, lambda: read_only.embeddings.create(model="minilm", input="a"))
err = expect_error("an unknown model is 404", openai.NotFoundError, 404, lambda: client.embeddings.create(model="text-embedding-3-small", input="a"))
check("the 404 names the model parameter", err.body.get("param") == "model", repr(err.body))
expect_error("an unknown model to retrieve is 404", openai.NotFoundError, 404, lambda: client.models.retrieve("nope"))
expect_error("an oversized body is 413", openai.APIStatusError, 413, lambda: client.embeddings.create(model="minilm", input="z " * 1_500_000))
expect_error("dimensions past the model's width is 400", openai.BadRequestError, 400, lambda: client.embeddings.create(model="minilm", input="a", dimensions=385))

# A rate-limited key (1 input per second): 429 with Retry-After, which the
# SDK's own retry honours.
limited = openai.OpenAI(base_url=URL, api_key=os.environ["ACME_LIMITED_KEY"], max_retries=0)
limited.embeddings.create(model="minilm", input="first")
err = expect_error("over its rate, a key gets 429", openai.RateLimitError, 429, lambda: limited.embeddings.create(model="minilm", input="second"))
check("the 429 carries Retry-After", "retry-after" in err.response.headers, repr(dict(err.response.headers)))
retrying = openai.OpenAI(base_url=URL, api_key=os.environ["ACME_LIMITED_KEY"], max_retries=3)
# Each round empties the key's bucket, then calls with retries at once; on a
# loaded machine the bucket may refill in between, so a few rounds (bounded).
for _ in range(5):
    try:
        limited.embeddings.create(model="minilm", input="spend the token")
    except openai.RateLimitError:
        pass
    after = retrying.embeddings.with_raw_response.create(model="minilm", input="third")
    check("a call with retries succeeds", len(after.parse().data) == 1)
    if after.retries_taken >= 1:
        break
check("the SDK retried after a 429 and then succeeded", after.retries_taken >= 1, f"retries {after.retries_taken}")
print("all SDK checks passed")
