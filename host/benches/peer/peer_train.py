#!/usr/bin/env python3
"""The peer of `whet train` for sentence classification: the same fine-tune in PyTorch + PEFT.

Trains an encoder (BERT family, e.g. all-MiniLM-L6-v2) with mean pooling, dropout and a linear
classifier — the model `whet` builds for `task = "classification"`, `pooling = "mean"` — with
PEFT LoRA on the encoder and the classifier trained whole (`modules_to_save`), AdamW, a linear
schedule with warm-up and gradient clipping, on exactly the examples `whet` trains and holds
out: the token ids come from `whet data preview RECIPE --json --split train|validation`. It
prints the mean and median seconds per optimizer step, the held-out accuracy and the peak RSS,
and with `--whet SUMMARY.json` (`whet train RECIPE --json` of the same recipe, run in the same
sitting) Whetstone's seconds per step as a ratio of the peer's.

Optional: nothing in the test suite runs it. It needs torch, transformers and peft
(`pip install -r host/benches/peer/requirements.txt`). See host/benches/peer/README.md.
"""

import argparse
import json
import math
import random
import statistics
import sys
import time

from peer_bench import import_peer, peak_rss_mb


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face model directory (BERT family)")
    p.add_argument("--train", required=True, metavar="PREVIEW.json",
                   help="`whet data preview RECIPE --json --split train -n 1000000`")
    p.add_argument("--validation", required=True, metavar="PREVIEW.json",
                   help="`whet data preview RECIPE --json --split validation -n 1000000`")
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--target-modules", default="query,value")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--whet", metavar="SUMMARY.json",
                   help="`whet train RECIPE --json` of the same recipe, to print ratios")
    return p.parse_args()


def read_examples(path):
    """(token ids, class) pairs from a `whet data preview --json` report."""
    with open(path) as f:
        report = json.load(f)
    shown = report["shown"]
    if len(shown) != report["examples"]:
        sys.exit(f"peer_train: {path} shows {len(shown)} of {report['examples']} examples; "
                 "run `whet data preview` with a larger -n")
    return [([t["id"] for t in e["token_list"]], int(e["label"])) for e in shown]


def batches(examples, size, torch):
    """Right-padded id and mask tensors and labels, padded to the longest of each batch."""
    for start in range(0, len(examples), size):
        chunk = examples[start:start + size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (tokens, _) in enumerate(chunk):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        labels = torch.tensor([label for _, label in chunk])
        yield ids, mask, labels


def main():
    args = parse_args()
    torch, transformers, peft = import_peer("peer_train")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = read_examples(args.train)
    validation = read_examples(args.validation)

    class MeanPooledClassifier(torch.nn.Module):
        """`classifier(dropout(mean_pool(encoder(ids))))`, as `whet` builds it."""

        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder
            config = encoder.config
            self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)
            self.classifier = torch.nn.Linear(config.hidden_size, args.num_labels)
            torch.nn.init.normal_(self.classifier.weight, std=config.initializer_range)
            torch.nn.init.zeros_(self.classifier.bias)

        def forward(self, ids, mask):
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return self.classifier(self.dropout(pooled))

    encoder = transformers.AutoModel.from_pretrained(
        args.model, dtype=torch.float32, add_pooling_layer=False)
    encoder = peft.get_peft_model(encoder, peft.LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.target_modules.split(",")))
    model = MeanPooledClassifier(encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch)
    total = steps_per_epoch * args.epochs
    schedule = transformers.get_linear_schedule_with_warmup(
        optimizer, math.ceil(args.warmup_ratio * total), total)

    def evaluate():
        model.eval()
        correct = 0
        with torch.no_grad():
            for ids, mask, labels in batches(validation, args.eval_batch, torch):
                correct += (model(ids, mask).argmax(-1) == labels).sum().item()
        model.train()
        return correct / len(validation)

    order = random.Random(args.seed)
    samples = []
    start_all = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        shuffled = train[:]
        order.shuffle(shuffled)
        for ids, mask, labels in batches(shuffled, args.batch, torch):
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            samples.append(time.perf_counter() - start)
        print(f"epoch {epoch + 1}: last loss {loss.item():.4f}", file=sys.stderr)
    train_seconds = time.perf_counter() - start_all
    accuracy = evaluate()

    mean = statistics.fmean(samples)
    report = {
        "peer": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                f"peft {peft.__version__}",
        "model": args.model,
        "method": f"lora r={args.lora_r} alpha={args.lora_alpha} {args.target_modules}",
        "threads": args.threads,
        "batch": args.batch,
        "epochs": args.epochs,
        "steps": len(samples),
        "train_examples": len(train),
        "validation_examples": len(validation),
        "seconds_per_step": mean,
        "median_step_s": statistics.median(samples),
        "train_seconds": train_seconds,
        "accuracy": accuracy,
        "peak_rss_mb": peak_rss_mb(),
        "trainable_params": sum(p.numel() for p in params),
    }
    if args.whet:
        with open(args.whet) as f:
            whet = json.load(f)
        whet = whet.get("summary", whet)
        report["whetstone"] = {
            "seconds_per_step": whet["seconds_per_step"],
            "accuracy": whet["final_eval"]["accuracy"],
            "peak_rss_mb": whet["peak_rss_mb"],
        }
        report["whetstone_vs_peer"] = {
            "seconds_per_step": whet["seconds_per_step"] / mean,
            "accuracy_difference": whet["final_eval"]["accuracy"] - accuracy,
            "peak_rss": whet["peak_rss_mb"] / report["peak_rss_mb"],
        }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
