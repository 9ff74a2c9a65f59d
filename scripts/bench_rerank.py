"""The Python half of scripts/bench-rerank.sh (issue 18's rerank rate beside
sentence-transformers' CrossEncoder). Three subcommands:

    python3 scripts/bench_rerank.py pairs CORPUS JOBS DOCS OUT.json
        The benchmark's rerank jobs: job j's query is text j*(DOCS+1) of
        bench_corpus.json and its documents the DOCS texts after it. Needs
        only the standard library (the Rust side reads the same file).

    VENV/bin/python scripts/bench_rerank.py model MINILM_DIR CORPUS OUT_DIR
        A MiniLM-L6-sized cross-encoder for the benchmark, since no package
        registry ships a real one: all-MiniLM-L6-v2's encoder and pooler (its
        checkpoint has `pooler.dense`) under a seeded random classifier
        (BertForSequenceClassification, num_labels 1), the shape of
        cross-encoder/ms-marco-MiniLM-L-6-v2 (hidden 384, 6 layers, 12
        heads, 512 positions). The classifier is scaled so the benchmark's
        logits (on CORPUS's last texts, which no benchmark pair uses) spread
        over a few units, as a trained reranker's do (a random
        head at BERT's 0.02 gives logits a few hundredths apart, which would
        make any score difference look small). Its scores mean nothing.

    VENV/bin/python scripts/bench_rerank.py peer MODEL_DIR PAIRS.json OUT.json
        sentence-transformers' CrossEncoder(MODEL_DIR).predict on every pair
        of PAIRS.json at each BENCH_ST_BATCHES size, BENCH_THREADS torch
        threads: pairs/s per batch size, and the logits of the first run
        (the Rust side compares them with jetinfer's).
"""

import json
import os
import sys
import time

SEED = 18
# Spread of the benchmark model's logits on its calibration pairs: ms-marco
# cross-encoders' logits run from about -11 to +11.
LOGIT_STD = 4.0
CALIBRATION_PAIRS = 256


def make_pairs(corpus, jobs, docs, out):
    texts = json.load(open(corpus))
    need = jobs * (docs + 1)
    if need > len(texts):
        sys.exit(f"bench_rerank: {jobs} jobs of {docs} documents need {need} texts, "
                 f"{corpus} has {len(texts)}")
    cases = []
    for j in range(jobs):
        start = j * (docs + 1)
        cases.append({"query": texts[start], "documents": texts[start + 1:start + 1 + docs]})
    with open(out, "w") as f:
        json.dump({"corpus": os.path.basename(corpus), "jobs": cases}, f)


def make_model(minilm, corpus, out):
    import torch
    from transformers import BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(SEED)
    model = BertForSequenceClassification.from_pretrained(minilm, num_labels=1).eval()
    tok = BertTokenizerFast.from_pretrained(minilm)
    # The same pooler as the checkpoint's: only the classifier is new.
    from safetensors.torch import load_file
    base = load_file(os.path.join(minilm, "model.safetensors"))
    assert torch.equal(model.bert.pooler.dense.weight, base["pooler.dense.weight"])
    texts = json.load(open(corpus))
    # Calibrate on texts the benchmark's pairs do not use (the corpus's end).
    calib = texts[-2 * CALIBRATION_PAIRS:]
    enc = tok(calib[0::2], calib[1::2], padding=True, truncation="longest_first",
              max_length=512, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[:, 0]
        model.classifier.weight.mul_(LOGIT_STD / float(logits.std()))
        model.classifier.bias.sub_(model(**enc).logits[:, 0].mean())
    model.config.id2label = {0: "LABEL_0"}
    model.config.label2id = {"LABEL_0": 0}
    model.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = 512
    tok.save_pretrained(out)
    # all-MiniLM-L6-v2's tokenizer.json pads to 128 and cuts at 128 (data
    # README): leave neither in the benchmark model, both sides set their own.
    path = os.path.join(out, "tokenizer.json")
    tokenizer = json.load(open(path))
    tokenizer["padding"] = None
    tokenizer["truncation"] = None
    json.dump(tokenizer, open(path, "w"))
    path = os.path.join(out, "tokenizer_config.json")
    config = json.load(open(path))
    config.pop("max_length", None)
    json.dump(config, open(path, "w"), indent=2)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("# minilm-cross-encoder: a benchmark model, not a reranker\n\n"
                "all-MiniLM-L6-v2's encoder and pooler with a seeded random classifier\n"
                f"(seed {SEED}, logits scaled to std {LOGIT_STD}), written by\n"
                "`scripts/bench_rerank.py model` for `scripts/bench-rerank.sh`. Its scores\n"
                "mean nothing; its shape and cost are cross-encoder/ms-marco-MiniLM-L-6-v2's.\n")
    print(f"bench_rerank: wrote {out}", file=sys.stderr)


def peer(model_dir, pairs_file, out):
    import numpy as np
    import sentence_transformers
    import torch
    from sentence_transformers import CrossEncoder

    threads = int(os.environ.get("BENCH_THREADS", str(os.cpu_count())))
    batches = [int(b) for b in os.environ.get("BENCH_ST_BATCHES", "16,32").split(",")]
    torch.set_num_threads(threads)
    jobs = json.load(open(pairs_file))["jobs"]
    pairs = [(job["query"], d) for job in jobs for d in job["documents"]]
    model = CrossEncoder(model_dir, device="cpu")
    identity = torch.nn.Identity()
    model.predict(pairs[:64], batch_size=16, activation_fn=identity)  # warm-up
    runs, logits = [], None
    for b in batches:
        t0 = time.perf_counter()
        got = model.predict(pairs, batch_size=b, activation_fn=identity, convert_to_numpy=True)
        dt = time.perf_counter() - t0
        if logits is None:
            logits = np.asarray(got, dtype=np.float64).reshape(-1)
        runs.append({"batch": b, "pairs_per_s": len(pairs) / dt})
        print(f"bench_rerank: CrossEncoder batch {b}: {len(pairs) / dt:.1f} pairs/s",
              file=sys.stderr, flush=True)
    max_len = model.max_seq_length
    tokens = sum(len(model.tokenizer(q, d, truncation="longest_first", max_length=max_len)
                     ["input_ids"]) for q, d in pairs)
    best = max(runs, key=lambda r: r["pairs_per_s"])
    per_job, at = [], 0
    for job in jobs:
        n = len(job["documents"])
        per_job.append(logits[at:at + n].tolist())
        at += n
    with open(out, "w") as f:
        json.dump({
            "peer": f"sentence-transformers {sentence_transformers.__version__} CrossEncoder, "
                    f"torch {torch.__version__} f32, {threads} threads",
            "max_length": max_len,
            "tokens": tokens,
            "runs": runs,
            "best": best,
            "logits": per_job,
        }, f)


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "pairs":
        make_pairs(args[0], int(args[1]), int(args[2]), args[3])
    elif command == "model":
        make_model(args[0], args[1], args[2])
    elif command == "peer":
        peer(args[0], args[1], args[2])
    else:
        sys.exit(f"bench_rerank: unknown command {command!r} (pairs, model, peer)")


if __name__ == "__main__":
    main()
