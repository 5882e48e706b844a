#!/usr/bin/env python3
"""Independent reference for the host's BERT encoder (all-MiniLM-L6-v2) and its tokenization.

This script re-implements, in plain numpy and float64, what the Rust host does for
all-MiniLM-L6-v2, without sharing any code with it:

* tokenization: BERT's basic tokenizer (lower-casing, accent stripping, punctuation split) and
  greedy longest-match WordPiece over `vocab.txt`, written here from scratch (the host uses the
  `tokenizers` crate on `tokenizer.json`);
* weights: `model.safetensors` parsed by hand (8-byte header length, JSON header, raw f32 data);
* forward: embeddings + LayerNorm, 6 post-LayerNorm encoder layers (12-head attention with a
  padding mask, erf GELU), mean pooling over the attention mask (sentence-transformers).

It writes `minilm_embeddings.json` next to itself: for each sentence its token ids and its
mean-pooled (not normalised) embedding, plus the cosines of the normalised embeddings. The Rust
test `host/tests/bert.rs` compares the host against this file (|Δ| <= 1e-4 per value).

Regenerate (needs the fetched asset, `whet assets fetch`):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install numpy
    /tmp/refenv/bin/python tests/reference/minilm_embeddings.py \
        [--model ~/.cache/whetstone/assets/all-minilm-l6-v2]

Generated with numpy 2.4.6.
"""

import argparse
import json
import math
import os
import struct
import unicodedata

import numpy as np

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an acoustic guitar.",
    "The stock market fell sharply on Monday.",
]


def load_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue  # e.g. the int64 `embeddings.position_ids` buffer
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtype="<f4").reshape(info["shape"]).astype(np.float64)
    return tensors


def is_punct(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def basic_tokenize(text):
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    words, current = [], ""
    for ch in text:
        if ch.isspace():
            if current:
                words.append(current)
            current = ""
        elif is_punct(ch):
            if current:
                words.append(current)
            words.append(ch)
            current = ""
        else:
            current += ch
    if current:
        words.append(current)
    return words


def wordpiece(word, vocab):
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                pieces.append(vocab[piece])
                break
            end -= 1
        else:
            return [vocab["[UNK]"]]
        start = end
    return pieces


def tokenize(text, vocab):
    ids = [vocab["[CLS]"]]
    for word in basic_tokenize(text):
        ids.extend(wordpiece(word, vocab))
    return ids + [vocab["[SEP]"]]


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


ERF = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + ERF(x / math.sqrt(2.0)))


def encode(ids, mask, t, cfg):
    b, s = ids.shape
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d, eps = h // heads, cfg["layer_norm_eps"]
    x = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.position_embeddings.weight"][np.arange(s)][None]
        + t["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    bias = (1.0 - mask[:, None, None, :]) * -1e4
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def lin(v, name):
            return v @ t[p + name + ".weight"].T + t[p + name + ".bias"]

        def split(v):
            return v.reshape(b, s, heads, d).transpose(0, 2, 1, 3)

        q = split(lin(x, "attention.self.query"))
        k = split(lin(x, "attention.self.key"))
        v = split(lin(x, "attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + bias
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
        a = layer_norm(lin(ctx, "attention.output.dense") + x, t[p + "attention.output.LayerNorm.weight"],
                       t[p + "attention.output.LayerNorm.bias"], eps)
        ff = lin(gelu(lin(a, "intermediate.dense")), "output.dense")
        x = layer_norm(ff + a, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
    m = mask[:, :, None]
    return (x * m).sum(1) / m.sum(1)


def main():
    ap = argparse.ArgumentParser()
    default = os.path.join(os.environ.get("WHETSTONE_CACHE", os.path.expanduser("~/.cache/whetstone")),
                           "assets", "all-minilm-l6-v2")
    ap.add_argument("--model", default=default)
    args = ap.parse_args()
    with open(os.path.join(args.model, "vocab.txt"), encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    t = load_safetensors(os.path.join(args.model, "model.safetensors"))
    token_ids = [tokenize(s, vocab) for s in SENTENCES]
    n = max(len(ids) for ids in token_ids)
    ids = np.array([x + [0] * (n - len(x)) for x in token_ids])
    mask = np.array([[1.0] * len(x) + [0.0] * (n - len(x)) for x in token_ids])
    emb = encode(ids, mask, t, cfg)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    out = {
        "generator": "tests/reference/minilm_embeddings.py (numpy float64, own WordPiece and safetensors reader)",
        "model": "all-MiniLM-L6-v2",
        "sentences": [
            {"text": s, "token_ids": x, "mean_pooled": [float(v) for v in e]}
            for s, x, e in zip(SENTENCES, token_ids, emb)
        ],
        "cosine_paraphrase": float(unit[0] @ unit[1]),
        "cosine_unrelated": float(unit[0] @ unit[2]),
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_embeddings.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}: paraphrase {out['cosine_paraphrase']:.4f}, unrelated {out['cosine_unrelated']:.4f}")


if __name__ == "__main__":
    main()
