"""The official OpenAI Python SDK's Batch API against a real jetinfer gateway.

Run by gateway/tests/openai_sdk_batches.rs with one mode argument:

- `api`: the whole Batch API against a MiniLM worker: files.create ->
  batches.create -> poll batches.retrieve -> files.content (every custom_id
  once, embeddings match the golden file, cosine >= 0.9999); batches.cancel;
  batches.list pagination; bad files (not JSONL, a wrong url, duplicate
  custom_ids, purpose, endpoint); another tenant's key gets 404.
- `start N`: uploads N echo requests, creates a batch, prints
  `batch=<id>` and exits (the test then kills the gateway mid-batch).
- `finish ID N`: polls batch ID to completed through the new gateway and
  checks its output holds each of the N custom_ids exactly once.

Environment: JETINFER_GATEWAY_URL, ACME_KEY, GLOBEX_KEY, ACME_READ_ONLY_KEY,
JETINFER_GOLDEN (api mode). The SDK is used as shipped. Exits non-zero on the
first failed check, naming it.
"""

import base64
import io
import json
import math
import os
import sys
import time

import openai

URL = os.environ["JETINFER_GATEWAY_URL"] + "/v1"
MIN_COSINE = 0.9999
# Bounded polling: every wait below ends by this many seconds.
POLL_FOR = 240


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def check(what, ok, detail=""):
    if not ok:
        print(f"FAILED: {what} {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


def expect_error(what, cls, status, call):
    try:
        call()
    except cls as err:
        check(what, err.status_code == status, f"status {err.status_code}")
        body = err.body if isinstance(err.body, dict) else {}
        check(f"{what}: OpenAI error shape", "message" in body and "type" in body and "param" in body and "code" in body, repr(err.body))
        return err
    check(what, False, "no error raised")


def line(custom_id, body, url="/v1/embeddings"):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}) + "\n"


def upload(client, text, name="input.jsonl"):
    return client.files.create(file=(name, io.BytesIO(text.encode()), "application/jsonl"), purpose="batch")


def wait(client, batch_id, done):
    deadline = time.monotonic() + POLL_FOR
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        time.sleep(0.2)
    check(f"batch {batch_id} reached its status within {POLL_FOR}s", False, repr(client.batches.retrieve(batch_id)))


def final(batch):
    return batch.status in ("completed", "failed", "cancelled", "expired")


def output_lines(client, file_id):
    text = client.files.content(file_id).text
    return [json.loads(l) for l in text.splitlines() if l.strip()]


def exactly_once(lines, want):
    ids = [l["custom_id"] for l in lines]
    return sorted(ids) == sorted(want) and len(set(ids)) == len(ids)


def api():
    golden = json.load(open(os.environ["JETINFER_GOLDEN"]))
    texts, reference = golden["texts"], golden["embeddings"]
    client = openai.OpenAI(base_url=URL, api_key=os.environ["ACME_KEY"], max_retries=0)

    # The lifecycle: every golden text its own request, one asking base64;
    # the empty golden text is refused in the batch as OpenAI refuses it.
    kept = [i for i, t in enumerate(texts) if t]
    body = "".join(line(f"g-{i}", {"model": "minilm", "input": texts[i]}) for i in kept)
    body += line("g-b64", {"model": "minilm", "input": [texts[i] for i in kept[:2]], "encoding_format": "base64", "dimensions": 64})
    body += line("g-empty", {"model": "minilm", "input": ""})
    file = upload(client, body)
    check("files.create stores the file", file.id.startswith("file-") and file.bytes == len(body.encode()) and file.purpose == "batch", repr(file))
    check("files.retrieve", client.files.retrieve(file.id).id == file.id)
    check("files.content gives the upload back", client.files.content(file.id).text == body)
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h", metadata={"run": "sdk"})
    check("batches.create", batch.status == "validating" and batch.input_file_id == file.id and batch.metadata == {"run": "sdk"}, repr(batch))
    done = wait(client, batch.id, final)
    check("the batch completed", done.status == "completed", repr(done))
    n = len(kept) + 1
    check("request_counts", (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (n + 1, n, 1), repr(done.request_counts))
    errors = output_lines(client, done.error_file_id)
    check("the empty input is the one error line", [e["custom_id"] for e in errors] == ["g-empty"] and "empty" in errors[0]["error"]["message"], repr(errors))
    out = output_lines(client, done.output_file_id)
    check("every custom_id exactly once", exactly_once(out, [f"g-{i}" for i in kept] + ["g-b64"]), repr([l["custom_id"] for l in out]))
    by_id = {l["custom_id"]: l for l in out}
    worst = 1.0
    for i in kept:
        l = by_id[f"g-{i}"]
        if l["response"]["status_code"] != 200 or l["error"] is not None:
            check(f"g-{i} answered 200", False, repr(l))
        resp = l["response"]["body"]
        if resp["model"] != "minilm" or resp["usage"]["prompt_tokens"] <= 0:
            check(f"g-{i}: model and usage as /v1/embeddings answers", False, repr(resp))
        worst = min(worst, cosine(resp["data"][0]["embedding"], reference[i]))
    check(f"batch embeddings of {len(kept)} golden texts match the golden file", worst >= MIN_COSINE, f"lowest cosine {worst}")
    same = client.embeddings.create(model="minilm", input=texts[kept[0]], encoding_format="float")
    check("a batch line's model is /v1/embeddings' for the same request", same.model == by_id[f"g-{kept[0]}"]["response"]["body"]["model"])
    b64 = by_id["g-b64"]["response"]["body"]["data"]
    check("base64 and dimensions in a batch line", len(b64) == 2 and isinstance(b64[0]["embedding"], str) and len(base64.b64decode(b64[0]["embedding"])) == 64 * 4, repr(b64[0])[:200])
    check("files.retrieve of the output", client.files.retrieve(done.output_file_id).purpose == "batch_output")

    # Tenant isolation: another tenant's key finds none of it.
    globex = openai.OpenAI(base_url=URL, api_key=os.environ["GLOBEX_KEY"], max_retries=0)
    expect_error("another tenant's file is 404", openai.NotFoundError, 404, lambda: globex.files.retrieve(file.id))
    expect_error("another tenant's file content is 404", openai.NotFoundError, 404, lambda: globex.files.content(file.id))
    expect_error("another tenant's delete is 404", openai.NotFoundError, 404, lambda: globex.files.delete(file.id))
    expect_error("another tenant's batch is 404", openai.NotFoundError, 404, lambda: globex.batches.retrieve(batch.id))
    expect_error("another tenant's cancel is 404", openai.NotFoundError, 404, lambda: globex.batches.cancel(batch.id))
    expect_error("another tenant's input file is 404", openai.NotFoundError, 404, lambda: globex.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h"))
    check("another tenant lists none of its batches", batch.id not in [b.id for b in globex.batches.list()])
    read_only = openai.OpenAI(base_url=URL, api_key=os.environ["ACME_READ_ONLY_KEY"], max_retries=0)
    check("a read-only key may read a batch", read_only.batches.retrieve(batch.id).id == batch.id)
    expect_error("a read-only key may not upload", openai.PermissionDeniedError, 403, lambda: upload(read_only, body))

    # Cancel: a batch long enough to be cancelled while it runs.
    long = "".join(line(f"c-{i}", {"model": "minilm", "input": f"{texts[i % len(texts)]} number {i}"}) for i in range(3000))
    cancelled = client.batches.create(input_file_id=upload(client, long).id, endpoint="/v1/embeddings", completion_window="24h")
    asked = client.batches.cancel(cancelled.id)
    check("batches.cancel answers cancelling", asked.status in ("cancelling", "cancelled"), repr(asked))
    ended = wait(client, cancelled.id, final)
    check("the cancelled batch ends cancelled", ended.status == "cancelled" and ended.cancelled_at is not None, repr(ended))
    check("a cancelled batch stopped before its end", ended.request_counts.completed < 3000, repr(ended.request_counts))
    expect_error("cancelling a completed batch is 409", openai.ConflictError, 409, lambda: client.batches.cancel(batch.id))

    # Bad files: lines that are not JSON or ask another url end in the error
    # file in OpenAI's line shape; duplicate custom_ids fail the batch.
    bad = line("ok-1", {"model": "minilm", "input": "fine"}) + "this is not json\n" + line("chat", {"model": "minilm", "input": "x"}, url="/v1/chat/completions")
    mixed = wait(client, client.batches.create(input_file_id=upload(client, bad).id, endpoint="/v1/embeddings", completion_window="24h").id, final)
    check("a file with bad lines completes with them failed", mixed.status == "completed" and mixed.request_counts.completed == 1 and mixed.request_counts.failed == 2, repr(mixed))
    errors = output_lines(client, mixed.error_file_id)
    check("two error lines in OpenAI's shape", len(errors) == 2 and all(set(e) == {"id", "custom_id", "response", "error"} and e["error"]["code"] and e["error"]["message"] for e in errors), repr(errors))
    chat = [e for e in errors if e["custom_id"] == "chat"]
    check("the wrong url is named", len(chat) == 1 and "url" in chat[0]["error"]["message"], repr(errors))
    dup = line("same", {"model": "minilm", "input": "a"}) + line("same", {"model": "minilm", "input": "b"})
    failed = wait(client, client.batches.create(input_file_id=upload(client, dup).id, endpoint="/v1/embeddings", completion_window="24h").id, final)
    check("duplicate custom_ids fail the batch", failed.status == "failed" and failed.errors.data[0].code == "duplicate_custom_id" and failed.errors.data[0].line == 2, repr(failed))
    err = expect_error("a file over batches.max_file_bytes (1 MiB here) is 413", openai.APIStatusError, 413, lambda: upload(client, line("big", {"model": "minilm", "input": "x" * ((1 << 20) + 1000)})))
    check("the 413 names file", err.body.get("param") == "file", repr(err.body))
    err = expect_error("an upload past the body bound is 413", openai.APIStatusError, 413, lambda: upload(client, "y" * (2 << 20)))
    check("that 413 names file too", err.body.get("param") == "file", repr(err.body))
    expect_error("purpose other than batch is 400", openai.BadRequestError, 400, lambda: client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune"))
    err = expect_error("an unserved endpoint is 400", openai.BadRequestError, 400, lambda: client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"))
    check("the 400 names endpoint", err.body.get("param") == "endpoint", repr(err.body))
    err = expect_error("an unknown file is 404", openai.NotFoundError, 404, lambda: client.batches.create(input_file_id="file-nope", endpoint="/v1/embeddings", completion_window="24h"))
    check("the 404 names input_file_id", err.body.get("param") == "input_file_id", repr(err.body))
    expect_error("an unknown batch is 404", openai.NotFoundError, 404, lambda: client.batches.retrieve("batch_nope"))

    # Pagination: newest first, `after` the last id of the page before.
    made = []
    for _ in range(3):
        made.append(client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h").id)
        time.sleep(0.01)  # ids sort by their millisecond
    page = client.batches.list(limit=2)
    check("a page of 2, newest first, has more", [b.id for b in page.data] == made[::-1][:2] and page.has_more, repr([b.id for b in page.data]))
    # Iterating a page fetches the next ones (after=last id) until has_more is false.
    seen = [b.id for b in client.batches.list(limit=2)]
    everyone = made + [batch.id, cancelled.id, mixed.id, failed.id]
    check("auto-pagination lists every batch once, newest first", sorted(seen) == sorted(everyone) and seen == sorted(seen, reverse=True), repr(seen))
    expect_error("limit 0 is 400", openai.BadRequestError, 400, lambda: client.batches.list(limit=0))

    # files.list: newest first, purpose filter, pages by `after`.
    listed = [f.id for f in client.files.list()]
    check("files.list lists the upload and the batch's output", file.id in listed and done.output_file_id in listed, repr(listed))
    check("files.list is newest id first", listed == sorted(listed, reverse=True), repr(listed))
    inputs = [f.id for f in client.files.list(purpose="batch")]
    check("files.list(purpose=batch) holds only uploads", file.id in inputs and done.output_file_id not in inputs and all(client.files.retrieve(i).purpose == "batch" for i in inputs[:3]), repr(inputs))
    page = client.files.list(purpose="batch", limit=1)
    check("a page of one file has more", len(page.data) == 1 and page.has_more and page.data[0].id == inputs[0], repr(page))
    check("auto-pagination by after lists every upload once", [f.id for f in client.files.list(purpose="batch", limit=2)] == inputs, repr(inputs))
    check("another tenant lists none of these files", not set(listed) & {f.id for f in globex.files.list()})
    expect_error("files.list limit 0 is 400", openai.BadRequestError, 400, lambda: client.files.list(limit=0))

    deleted = client.files.delete(file.id)
    check("files.delete", deleted.deleted and deleted.id == file.id)
    expect_error("a deleted file is 404", openai.NotFoundError, 404, lambda: client.files.retrieve(file.id))
    print("all batch SDK checks passed")


def start(n):
    client = openai.OpenAI(base_url=URL, api_key=os.environ["ACME_KEY"], max_retries=0)
    body = "".join(line(f"r-{i}", {"model": "minilm", "input": f"restart request {i} with some words"}) for i in range(n))
    batch = client.batches.create(input_file_id=upload(client, body).id, endpoint="/v1/embeddings", completion_window="24h")
    print(f"batch={batch.id}", flush=True)


def finish(batch_id, n):
    # Retries on: the new gateway may still be starting.
    client = openai.OpenAI(base_url=URL, api_key=os.environ["ACME_KEY"], max_retries=5)
    done = wait(client, batch_id, final)
    check("the batch completed after the gateway restart", done.status == "completed", repr(done))
    check("request_counts after the restart", (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (n, n, 0), repr(done.request_counts))
    out = output_lines(client, done.output_file_id)
    check("every line exactly once after the restart", exactly_once(out, [f"r-{i}" for i in range(n)]), f"{len(out)} lines")
    print("all restart SDK checks passed")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "api":
        api()
    elif mode == "start":
        start(int(sys.argv[2]))
    elif mode == "finish":
        finish(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {mode}")
