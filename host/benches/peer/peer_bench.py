#!/usr/bin/env python3
"""The peer of `whet bench train`: the same training step in PyTorch + transformers + PEFT.

Runs LoRA (or full fine-tuning) steps on random token batches with AdamW, exactly as
`whet bench train` does, and prints the same JSON figures: step time (median/min/max over the
timed steps after warm-up), tokens/s and peak RSS. With `--whet REPORT.json` (the output of
`whet bench train` for the same configuration, measured in the same sitting) it also prints
Whetstone's step time and peak RSS as ratios of the peer's.

Optional: nothing in the test suite runs it. It needs torch, transformers and peft
(`pip install -r host/benches/peer/requirements.txt`) and, to read SmolLM2's GGUF file, `gguf`.
See host/benches/peer/README.md.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="a GGUF file (dequantized to f32 by transformers), e.g. "
                     "SmolLM2-135M-Instruct.Q4_1.gguf from `whet assets path smollm2-135m-instruct`")
    src.add_argument("--model", help="a Hugging Face model directory (f32 safetensors)")
    p.add_argument("--task", choices=["causal-lm", "classification"], default="causal-lm")
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (Whetstone: "
                   "RAYON_NUM_THREADS)")
    p.add_argument("--lora-r", type=int, default=8, help="0: train every parameter")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--whet", metavar="REPORT.json",
                   help="a `whet bench train` report of the same configuration, to print ratios")
    return p.parse_args()


def peak_rss_mb():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def import_peer(tool):
    """torch, transformers and peft, or an exit naming `tool` and how to install them."""
    try:
        import torch
        import transformers
        import peft
    except ImportError as e:
        sys.exit(f"{tool}: {e}; install the peer with "
                 "`pip install -r host/benches/peer/requirements.txt`")
    return torch, transformers, peft


def main():
    args = parse_args()
    torch, transformers, peft = import_peer("peer_bench")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.gguf:
        directory, name = os.path.split(os.path.abspath(args.gguf))
        load = dict(pretrained_model_name_or_path=directory, gguf_file=name)
    else:
        load = dict(pretrained_model_name_or_path=args.model)
    if args.task == "causal-lm":
        model = transformers.AutoModelForCausalLM.from_pretrained(**load, dtype=torch.float32)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            **load, dtype=torch.float32, num_labels=args.num_labels)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if args.lora_r > 0:
        config = peft.LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
            target_modules=args.target_modules.split(","),
            task_type="CAUSAL_LM" if args.task == "causal-lm" else "SEQ_CLS")
        model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)

    samples = []
    phases = []
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator)
        mask = torch.ones_like(ids)
        if args.task == "causal-lm":
            labels = ids
        else:
            labels = torch.randint(0, args.num_labels, (args.batch,), generator=generator)
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        forward = time.perf_counter()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if i >= args.warmup:
            samples.append(end - start)
            phases.append((forward - start, backward - forward, end - backward))

    median = statistics.median(samples)
    report = {
        "peer": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                f"peft {peft.__version__}",
        "model": args.gguf or args.model,
        "method": f"lora r={args.lora_r} {args.target_modules}" if args.lora_r else "full",
        "gradient_checkpointing": args.gradient_checkpointing,
        "threads": args.threads,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "step_time_s": {"median": median, "min": min(samples), "max": max(samples)},
        "phases_median_s": {
            "forward": statistics.median(p[0] for p in phases),
            "backward": statistics.median(p[1] for p in phases),
            "optimizer": statistics.median(p[2] for p in phases),
        },
        "tokens_per_s": args.batch * args.seq / median,
        "peak_rss_mb": peak_rss_mb(),
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
    if args.whet:
        with open(args.whet) as f:
            whet = json.load(f)
        report["whetstone_vs_peer"] = {
            "step_time": whet["step_time_s"]["median"] / median,
            "tokens_per_s": whet["tokens_per_s"] / report["tokens_per_s"],
            "peak_rss": (whet["peak_rss_mb"] or float("nan")) / report["peak_rss_mb"],
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
