"""PEFT interop fixtures and checks for Whetstone (DESIGN.md principle 4).

Two directions:

* ``generate [OUT] [NAME ...]`` (default ``tests/fixtures/peft``, every fixture) writes, for a
  tiny random LlamaForCausalLM and a tiny random BertForSequenceClassification, the base model
  (``model/``: config.json, model.safetensors, tokenizer.json), a PEFT LoRA adapter saved with
  ``save_pretrained`` (``adapter/``) and ``expected.json`` with fixed inputs and the outputs of
  the model with the adapter. The ``llama-<method>`` fixtures hold only ``adapter/`` and
  ``expected.json`` for other methods on the same tiny Llama (``llama/model``): DoRA (LoRA with
  ``use_dora``), IA3, LoHa and LoKr, every adapter parameter multiplied by ``1 + 0.2·N(0, 1)``
  after creation so that none is at its identity value. Naming fixtures (``llama``, ``bert``,
  ``llama-dora``, ...) writes only those. ``tests/tests/peft_interop.rs`` loads them through
  Whetstone's adapter loader and compares.
* ``check DIR`` loads the adapters Whetstone wrote (``DIR/<fixture>/adapter``, by
  ``WHETSTONE_PEFT_OUT=DIR cargo test -p whetstone-tests --test peft_interop``) with
  ``PeftModel.from_pretrained`` onto the fixture models and compares with the outputs Whetstone
  recorded (``DIR/<fixture>/ours.json``); the merged models Whetstone wrote
  (``DIR/<fixture>/merged``) are loaded with plain transformers and compared the same way.
  Fixtures without ``ours.json`` are skipped. Exits 1 above the tolerance.

BERT: Hugging Face's BertForSequenceClassification classifies the tanh ``pooler`` of the [CLS]
state; Whetstone's head classifies the mean of the token states (no pooler). So the BERT
``logits`` here are the PEFT model's own ``classifier`` (the ``modules_to_save`` copy) applied to
the masked mean of the last hidden state, computed from PEFT's forward; ``hidden`` is that last
hidden state. Both come from the PEFT-wrapped model, so LoRA on query/value and the saved
classifier are both checked.

Needs: torch, transformers, peft, safetensors, tokenizers (pip install torch transformers peft).
"""

import json
import os
import sys

import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 64
SEED = 1234
TOLERANCE = 1e-4

LLAMA_IDS = [[1, 5, 9, 17, 33, 40, 2, 63], [1, 8, 13, 21, 34, 55, 0, 0]]
LLAMA_MASK = [[1] * 8, [1, 1, 1, 1, 1, 1, 0, 0]]
BERT_IDS = [[2, 7, 11, 19, 29, 41, 3], [2, 6, 12, 24, 3, 0, 0]]
BERT_MASK = [[1] * 7, [1, 1, 1, 1, 1, 0, 0]]


def word_level(specials, post=None):
    """A whitespace word-level tokenizer over specials + w<i> words (VOCAB ids)."""
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), VOCAB):
        vocab[f"w{i}"] = i
    unk = "[UNK]" if "[UNK]" in vocab else "<unk>"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    if post is not None:
        tok.post_processor = post
    return tok


def llama_base():
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=1000.0,  # not the default: checks `rope_parameters` is read
        tie_word_embeddings=False,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).eval()


def bert_base():
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        initializer_range=0.1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        num_labels=2,
    )
    torch.manual_seed(SEED + 1)
    return BertForSequenceClassification(config).eval()


def llama_outputs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return {"logits": out.logits.tolist()}


def bert_outputs(model, ids, mask):
    """Last hidden state, and the active classifier over its masked mean (Whetstone's head)."""
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        classifier = model.get_submodule("base_model.model.classifier") if isinstance(
            model, PeftModel
        ) else model.classifier
        logits = classifier(pooled)
    return {"logits": logits.tolist(), "hidden": hidden.tolist()}


def save_adapter(model, path):
    model.save_pretrained(path, safe_serialization=True)
    readme = os.path.join(path, "README.md")  # PEFT's model-card stub
    if os.path.exists(readme):
        os.remove(readme)


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def generate_llama(out):
    d = os.path.join(out, "llama")
    base = llama_base()
    base.save_pretrained(os.path.join(d, "model"), safe_serialization=True)
    word_level(["<unk>", "<s>", "</s>"]).save(os.path.join(d, "model", "tokenizer.json"))
    write_json(
        os.path.join(d, "model", "tokenizer_config.json"),
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"},
    )
    torch.manual_seed(SEED + 2)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, lora).eval()
    save_adapter(peft_model, os.path.join(d, "adapter"))
    expected = {"input_ids": LLAMA_IDS, "attention_mask": LLAMA_MASK}
    expected.update(llama_outputs(peft_model, LLAMA_IDS, LLAMA_MASK))
    write_json(os.path.join(d, "expected.json"), expected)


def generate_bert(out):
    d = os.path.join(out, "bert")
    base = bert_base()
    base.save_pretrained(os.path.join(d, "model"), safe_serialization=True)
    post = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    word_level(specials, post).save(os.path.join(d, "model", "tokenizer.json"))
    torch.manual_seed(SEED + 3)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        lora_dropout=0.0,
        init_lora_weights=False,
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    peft_model = get_peft_model(base, lora).eval()
    # A trained head differs from the base one: perturb the modules_to_save copy.
    with torch.no_grad():
        head = peft_model.get_submodule("base_model.model.classifier")
        for p in head.modules_to_save["default"].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_adapter(peft_model, os.path.join(d, "adapter"))
    expected = {"input_ids": BERT_IDS, "attention_mask": BERT_MASK}
    expected.update(bert_outputs(peft_model, BERT_IDS, BERT_MASK))
    write_json(os.path.join(d, "expected.json"), expected)


def method_config(method):
    """The PEFT config of a ``llama-<method>`` fixture (all on the tiny Llama)."""
    if method == "dora":
        return LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
            init_lora_weights=False,
            use_dora=True,
            task_type="CAUSAL_LM",
        )
    if method == "ia3":
        return IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            task_type="CAUSAL_LM",
        )
    if method == "loha":
        return LoHaConfig(
            r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False,
            task_type="CAUSAL_LM",
        )
    if method == "lokr":
        return LoKrConfig(
            r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False,
            task_type="CAUSAL_LM",
        )
    raise SystemExit(f"unknown method {method}")


METHODS = ["dora", "ia3", "loha", "lokr"]
FIXTURES = ["llama", "bert"] + [f"llama-{m}" for m in METHODS]


def generate_method(out, index, method):
    """``llama-<method>/``: a PEFT adapter of ``method`` on the tiny Llama, every adapter
    parameter perturbed (IA3 starts at ones, DoRA's magnitude at the weight norms), and the
    outputs. The base model is ``llama/model``."""
    d = os.path.join(out, f"llama-{method}")
    base = llama_base()
    torch.manual_seed(SEED + 10 + index)
    peft_model = get_peft_model(base, method_config(method)).eval()
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    save_adapter(peft_model, os.path.join(d, "adapter"))
    expected = {"input_ids": LLAMA_IDS, "attention_mask": LLAMA_MASK}
    expected.update(llama_outputs(peft_model, LLAMA_IDS, LLAMA_MASK))
    write_json(os.path.join(d, "expected.json"), expected)


def generate(out, names):
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        raise SystemExit(f"unknown fixtures {unknown}; known: {', '.join(FIXTURES)}")
    if "llama" in names:
        generate_llama(out)
    if "bert" in names:
        generate_bert(out)
    for index, method in enumerate(METHODS):
        if f"llama-{method}" in names:
            generate_method(out, index, method)
    print(f"fixtures {', '.join(names)} written to {out}")


def max_diff(a, b, mask=None, per_token=False):
    a, b = torch.tensor(a), torch.tensor(b)
    if a.shape != b.shape:
        raise SystemExit(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    d = (a - b).abs()
    if per_token and mask is not None:
        d = d[torch.tensor(mask).bool()]
    return d.max().item()


def check(dir_, fixtures):
    worst = 0.0
    for name in FIXTURES:
        kind = name.split("-")[0]  # the base model: llama-dora runs on llama/model
        load_base, outputs = {
            "llama": (LlamaForCausalLM, llama_outputs),
            "bert": (BertForSequenceClassification, bert_outputs),
        }[kind]
        ours_path = os.path.join(dir_, name, "ours.json")
        if not os.path.exists(ours_path):
            print(f"{name}: {ours_path} missing, skipped")
            continue
        with open(ours_path) as f:
            ours = json.load(f)
        base = load_base.from_pretrained(os.path.join(fixtures, kind, "model")).eval()
        model = PeftModel.from_pretrained(base, os.path.join(dir_, name, "adapter")).eval()
        theirs = outputs(model, ours["input_ids"], ours["attention_mask"])
        d = max_diff(ours["logits"], theirs["logits"], ours["attention_mask"], kind == "llama")
        print(f"{name}: max |Δlogits| (Whetstone adapter in PEFT vs Whetstone) = {d:.3e}")
        worst = max(worst, d)
        merged_dir = os.path.join(dir_, name, "merged")
        if os.path.isdir(merged_dir):
            merged = load_base.from_pretrained(merged_dir).eval()
            theirs = outputs(merged, ours["input_ids"], ours["attention_mask"])
            d = max_diff(
                ours["logits"], theirs["logits"], ours["attention_mask"], kind == "llama"
            )
            print(f"{name}: max |Δlogits| (Whetstone merged model in transformers) = {d:.3e}")
            worst = max(worst, d)
    if worst > TOLERANCE:
        raise SystemExit(f"FAILED: {worst:.3e} > {TOLERANCE}")
    print(f"ok (≤ {TOLERANCE})")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    fixtures = os.path.normpath(os.path.join(here, "..", "fixtures", "peft"))
    torch.set_num_threads(1)
    args = sys.argv[1:]
    if not args or args[0] not in ("generate", "check"):
        raise SystemExit("usage: peft_interop.py generate [OUT] [NAME ...] | check DIR")
    if args[0] == "generate":
        out = args[1] if len(args) > 1 else fixtures
        generate(out, args[2:] or FIXTURES)
    else:
        if len(args) < 2:
            raise SystemExit("usage: peft_interop.py check DIR")
        check(args[1], fixtures)


if __name__ == "__main__":
    main()
