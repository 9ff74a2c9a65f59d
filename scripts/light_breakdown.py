#!/usr/bin/env python3
"""Where one light-load job's time goes, from a nats-server trace.

Reads the log of a nats-server run with `-V` (protocol trace, microsecond
timestamps, one clock for every process) during a light-load run, where jobs
arrive one at a time, and prints the median of each step of a job's way:

  client HPUB job -> PubAck to client            (job stored)
  client HPUB job -> job delivered to the worker (pull delivery)
  delivered      -> worker publishes the result  (intake, batch, model, encode)
  result PUB     -> result's PubAck to the worker (result stored)
  result PUB     -> result delivered to the client (ordered consumer)
  PubAck         -> worker's +ACK                 (worker's reaction)
  +ACK           -> ack confirmed                 (double ack)

`scripts/bench-light.sh` runs it; alone:
  python3 scripts/light_breakdown.py NATS_LOG [LOADGEN_P50_MS [QUEUE_WAIT_MS INFERENCE_MS]]
With loadgen's p50, a row says what the client's side adds (the
scheduler's timer, encoding, the PubAck and result hand-offs inside the
client process): end-to-end p50 minus the server-seen p50. With the
worker's mean queue wait and inference (its histograms over the same run),
the worker's step is split into before, in and after the model (means).

Not a test: it prints figures. Jobs are told apart by order, so it needs a
load where a job is done before the next one starts (a light run).
"""

import re
import statistics
import sys
from datetime import datetime

LINE = re.compile(
    r"^\[\d+\] (\S+ \S+) \[TRC\] .*?cid:(\d+) - (?:.* - )?(<<-|->>) \[(\w+) ?(.*)\]$"
)


def when(stamp):
    return datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp() * 1e3


def events(path):
    with open(path, errors="replace") as log:
        for line in log:
            m = LINE.match(line.rstrip("\n"))
            if not m or m.group(4) not in ("PUB", "HPUB", "MSG", "HMSG"):
                continue
            stamp, cid, way, op, args = m.groups()
            parts = args.split()
            yield when(stamp), cid, way, op, parts


def reply_of(op, parts):
    """The reply subject of a PUB or HPUB, if it has one."""
    with_reply = 3 if op == "PUB" else 4
    return parts[1] if len(parts) == with_reply else None


def jobs(path):
    """Each job's steps in ms since its publish, keyed by step name."""
    found = []
    job = None
    replies = {}  # reply subject -> step to mark when the server answers it
    for t, cid, way, op, parts in events(path):
        subject = parts[0]
        if way == "<<-" and subject.startswith("jobs."):
            job = {"_t0": t, "_client": cid}
            found.append(job)
            reply = reply_of(op, parts)
            replies = {reply: "stored"} if reply else {}
            continue
        if job is None:
            continue
        rel = t - job["_t0"]
        if way == "->>":
            if op.endswith("MSG") and subject.startswith("jobs.") and "delivered" not in job:
                job["delivered"] = rel
                job["_worker"] = cid
            elif subject.startswith("results.") and cid == job["_client"]:
                job.setdefault("client_result", rel)
            elif subject in replies:
                job.setdefault(replies.pop(subject), rel)
        elif cid == job.get("_worker"):
            if subject.startswith("results.") and "result_pub" not in job:
                job["result_pub"] = rel
                if reply_of(op, parts):
                    replies[reply_of(op, parts)] = "result_stored"
            elif subject.startswith("$JS.ACK.") and "ack_sent" not in job:
                job["ack_sent"] = rel
                if reply_of(op, parts):
                    replies[reply_of(op, parts)] = "ack_confirmed"
    return found


STEPS = [
    ("job stored (client PUB -> PubAck sent)", None, "stored"),
    ("stored -> delivered to the worker", "stored", "delivered"),
    ("worker: delivered -> result PUB (intake, batch, model, encode)", "delivered", "result_pub"),
    ("result stored (result PUB -> PubAck sent)", "result_pub", "result_stored"),
    ("result PUB -> delivered to the client", "result_pub", "client_result"),
    ("server-seen total (client PUB -> result to client)", None, "client_result"),
    ("worker: result PubAck -> +ACK sent", "result_stored", "ack_sent"),
    ("double ack (+ACK -> confirmation sent)", "ack_sent", "ack_confirmed"),
]


def main():
    args = sys.argv[1:]
    found = [j for j in jobs(args[0]) if "client_result" in j]
    # The loadgen's probe job comes first, on a cold worker: left out.
    found = found[1:]
    if not found:
        sys.exit("no complete job in the trace")
    print(f"{'step':<66} {'p50 ms':>7} {'mean ms':>8}")
    for name, start, end in STEPS:
        spans = [j[end] - (j[start] if start else 0) for j in found if end in j and (not start or start in j)]
        if spans:
            print(f"{name:<66} {statistics.median(spans):7.2f} {statistics.fmean(spans):8.2f}")
    if len(args) > 1:
        seen = statistics.median(j["client_result"] for j in found)
        print(f"{'client side (loadgen p50 - server-seen p50)':<66} {float(args[1]) - seen:7.2f}")
    if len(args) > 3:
        # The worker's own histograms (means over the run): its queue wait
        # runs from the job's stored time (the server's, about when it read
        # the client's PUB) to the start of the job's batch.
        queue_wait, inference = float(args[2]), float(args[3])
        delivered = statistics.fmean(j["delivered"] for j in found)
        inside = statistics.fmean(j["result_pub"] - j["delivered"] for j in found)
        before = queue_wait - delivered
        print(f"{'  worker, of which: delivered -> batch starts (intake, tokenise, batcher)':<66} {'':7} {before:8.2f}")
        print(f"{'  worker, of which: the model (inference histogram)':<66} {'':7} {inference:8.2f}")
        print(f"{'  worker, of which: model done -> result PUB (hand-off, encode)':<66} {'':7} {inside - before - inference:8.2f}")
    print(f"jobs: {len(found)}")


if __name__ == "__main__":
    main()
