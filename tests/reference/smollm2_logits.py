#!/usr/bin/env python3
"""Independent reference for the host's SmolLM2 (Llama) forward pass and GGUF tokenizer.

This script re-implements, in plain numpy and float64, everything the Rust host does for
SmolLM2-135M-Instruct, without sharing any code with it:

* tokenization: a byte-level BPE written here from scratch over the GGUF's
  `tokenizer.ggml.tokens` / `tokenizer.ggml.merges` (GPT-2 byte-to-unicode table, the GPT-2
  pre-tokenizer regex, digits split one by one), special tokens matched first;
* weights: read and dequantized with gguf-py (`gguf.GGUFReader`, `gguf.quants.dequantize`) — not
  candle;
* forward: RMSNorm, grouped-query attention, SwiGLU MLP, tied output head; RoPE is applied in
  llama.cpp's own interleaved-pair layout directly on the GGUF q/k weights, so the host's
  un-permutation to the Hugging Face rotate-half layout is checked rather than copied.

It writes `smollm2_logits.json` next to itself: the prompt, its token ids, the top-20 logits of the
last position, the logits of a few fixed ids, and an 8-token greedy continuation. The Rust test
`host/tests/llama.rs` compares the host against this file (|Δlogit| <= 1e-3).

Regenerate (needs the fetched asset, `whet assets fetch`):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install numpy gguf
    /tmp/refenv/bin/python tests/reference/smollm2_logits.py \
        [--gguf ~/.cache/whetstone/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf]

Generated with numpy 2.4.6 and gguf 0.19.0.

The pre-tokenizer regex uses Python's `re`, where `\\p{L}` is spelled `[^\\W\\d_]` and `\\p{N}` is
spelled `\\d`: identical for the texts used here (letters, ASCII digits, punctuation).
"""

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

PROMPT = "The capital of France is"
GREEDY_STEPS = 8
FIXED_IDS = [0, 1, 2, 17, 1000, 12345, 49151]

DEFAULT_GGUF = (
    Path(os.environ.get("WHETSTONE_CACHE", Path.home() / ".cache" / "whetstone"))
    / "assets"
    / "smollm2-135m-instruct"
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)


# ---------------------------------------------------------------- tokenizer (byte-level BPE)


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


GPT2_SPLIT = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""",
)


class BpeTokenizer:
    def __init__(self, tokens, merges, token_types):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.specials = [t for t, ty in zip(tokens, token_types) if ty == 3]
        self.byte_map = bytes_to_unicode()

    def bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
        return [self.vocab[p] for p in parts]

    def encode_plain(self, text):
        ids = []
        # Digits(individual_digits=True): every digit is its own piece.
        for piece in re.split(r"(\d)", text):
            if not piece:
                continue
            for word in GPT2_SPLIT.findall(piece):
                mapped = "".join(self.byte_map[b] for b in word.encode("utf-8"))
                ids.extend(self.bpe(mapped))
        return ids

    def encode(self, text):
        if not self.specials:
            return self.encode_plain(text)
        pattern = "(" + "|".join(re.escape(s) for s in self.specials) + ")"
        ids = []
        for piece in re.split(pattern, text):
            if piece in self.specials:
                ids.append(self.vocab[piece])
            elif piece:
                ids.extend(self.encode_plain(piece))
        return ids


# ---------------------------------------------------------------- model


class Smollm2:
    def __init__(self, reader):
        f = reader.fields
        arch = f["general.architecture"].contents()
        cfg = lambda k: f[f"{arch}.{k}"].contents()  # noqa: E731
        self.n_layers = int(cfg("block_count"))
        self.n_heads = int(cfg("attention.head_count"))
        self.n_kv = int(cfg("attention.head_count_kv"))
        self.hidden = int(cfg("embedding_length"))
        self.head_dim = self.hidden // self.n_heads
        self.eps = float(cfg("attention.layer_norm_rms_epsilon"))
        self.theta = float(cfg("rope.freq_base"))
        self.w = {}
        for t in reader.tensors:
            arr = dequantize(t.data, t.tensor_type).astype(np.float64)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.w[t.name] = arr.reshape(shape)

    def rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope_interleaved(self, x):
        """llama.cpp's rope (mode 0): rotate adjacent pairs (x[2i], x[2i+1]). x: [heads, seq, dim]."""
        seq, d = x.shape[1], x.shape[2]
        inv = self.theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.arange(seq, dtype=np.float64)[:, None] * inv[None, :]
        cos, sin = np.cos(ang), np.sin(ang)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def forward(self, ids):
        w = self.w
        x = w["token_embd.weight"][ids]
        seq = len(ids)
        mask = np.triu(np.full((seq, seq), -np.inf), k=1)
        rep = self.n_heads // self.n_kv
        for i in range(self.n_layers):
            p = f"blk.{i}."
            h = self.rms(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).reshape(seq, self.n_heads, self.head_dim).transpose(1, 0, 2)
            k = (h @ w[p + "attn_k.weight"].T).reshape(seq, self.n_kv, self.head_dim).transpose(1, 0, 2)
            v = (h @ w[p + "attn_v.weight"].T).reshape(seq, self.n_kv, self.head_dim).transpose(1, 0, 2)
            q, k = self.rope_interleaved(q), self.rope_interleaved(k)
            k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
            s = q @ k.transpose(0, 2, 1) / np.sqrt(self.head_dim) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = (s @ v).transpose(1, 0, 2).reshape(seq, self.hidden)
            x = x + o @ w[p + "attn_output.weight"].T
            h = self.rms(x, w[p + "ffn_norm.weight"])
            g = h @ w[p + "ffn_gate.weight"].T
            u = h @ w[p + "ffn_up.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "ffn_down.weight"].T
        x = self.rms(x, w["output_norm.weight"])
        head = w.get("output.weight", w["token_embd.weight"])
        return x @ head.T


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("smollm2_logits.json"))
    args = ap.parse_args()

    reader = GGUFReader(str(args.gguf))
    f = reader.fields
    tok = BpeTokenizer(
        f["tokenizer.ggml.tokens"].contents(),
        f["tokenizer.ggml.merges"].contents(),
        f["tokenizer.ggml.token_type"].contents(),
    )
    ids = tok.encode(PROMPT)
    model = Smollm2(reader)
    logits = model.forward(ids)[-1]
    top = np.argsort(-logits)[:20]

    greedy, seq = [], list(ids)
    for _ in range(GREEDY_STEPS):
        nxt = int(np.argmax(model.forward(seq)[-1]))
        greedy.append(nxt)
        seq.append(nxt)

    extra = {
        "digits and unicode": "In 2024, 12 caf\u00e9s served 3.5 cr\u00e8mes br\u00fbl\u00e9es.",
        "chatml": "<|im_start|>user\nWhat is 7*8?<|im_end|>\n",
    }
    result = {
        "generator": "tests/reference/smollm2_logits.py (numpy float64, gguf-py dequantization)",
        "gguf": args.gguf.name,
        "prompt": PROMPT,
        "token_ids": ids,
        "last_position": {
            "top20": [{"id": int(i), "logit": float(logits[i])} for i in top],
            "fixed": [{"id": int(i), "logit": float(logits[i])} for i in FIXED_IDS],
        },
        "greedy_ids": greedy,
        "tokenizer_cases": [{"name": k, "text": v, "ids": tok.encode(v)} for k, v in extra.items()],
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"prompt ids {ids}; top-1 {int(top[0])} ({logits[top[0]]:.4f}); greedy {greedy}")


if __name__ == "__main__":
    main()
