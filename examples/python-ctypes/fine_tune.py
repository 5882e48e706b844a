"""Fine-tunes all-MiniLM-L6-v2 with the LoRA plugin through Whetstone's C ABI from Python's
ctypes: no Python ML runtime, only the standard library and libwhetstone.so.

The same flow as examples/c-embed: progress from a callback, evaluation, the PEFT adapter saved
and loaded back, sentence embeddings, a second run cancelled from its callback and continued,
and misuse answered with errors.

    cargo build -p whetstone-capi
    python3 examples/python-ctypes/fine_tune.py OUTPUT_DIR [--quick]

The library is found through $WHETSTONE_LIB (a path to libwhetstone.so), else in
$CARGO_TARGET_DIR/debug (default ~/.cache/whetstone/target/debug). Exits 0 when every check
passed.
"""

import ctypes
import json
import math
import os
import sys
from ctypes import (CFUNCTYPE, POINTER, Structure, byref, c_char_p, c_double, c_float,
                    c_int32, c_size_t, c_uint32, c_uint64, c_void_p)

# Must equal WHETSTONE_ABI_VERSION of host/capi/include/whetstone.h.
ABI_VERSION = 1
MIN_ACCURACY = 0.75

OK, CANCELLED, INVALID_ARGUMENT, INVALID_HANDLE = 0, 1, 2, 3


class Progress(Structure):
    _fields_ = [("step", c_uint64), ("total_steps", c_uint64), ("loss", c_double),
                ("learning_rate", c_double), ("grad_norm", c_double),
                ("tokens_per_second", c_double)]


class TrainReport(Structure):
    _fields_ = [("finished", c_int32), ("step", c_uint64), ("total_steps", c_uint64),
                ("last_loss", c_double), ("eval_loss", c_double), ("eval_accuracy", c_double),
                ("seconds_per_step", c_double), ("tokens_per_second", c_double)]


class EvalReport(Structure):
    _fields_ = [("loss", c_double), ("accuracy", c_double), ("perplexity", c_double),
                ("examples", c_uint64)]


ProgressFn = CFUNCTYPE(c_int32, POINTER(Progress), c_void_p)


def load_library():
    path = os.environ.get("WHETSTONE_LIB")
    if not path:
        target = os.environ.get("CARGO_TARGET_DIR",
                                os.path.expanduser("~/.cache/whetstone/target"))
        path = os.path.join(target, "debug", "libwhetstone.so")
    lib = ctypes.CDLL(path)
    u64, status = c_uint64, c_int32
    err = POINTER(c_uint64)
    signatures = {
        "whet_abi_version": (c_uint32, []),
        "whet_version": (c_char_p, []),
        "whet_contract_version": (c_char_p, []),
        "whet_status_name": (c_char_p, [c_int32]),
        "whet_error_message": (c_char_p, [u64]),
        "whet_error_free": (status, [u64]),
        "whet_log_init": (status, [c_char_p, err]),
        "whet_session_create": (status, [c_uint32, c_char_p, POINTER(u64), err]),
        "whet_session_configure": (status, [u64, c_char_p, err]),
        "whet_session_train": (status, [u64, u64, ProgressFn, c_void_p, POINTER(TrainReport),
                                        err]),
        "whet_session_evaluate": (status, [u64, POINTER(EvalReport), err]),
        "whet_session_save_adapter": (status, [u64, c_char_p, err]),
        "whet_session_load_adapter": (status, [u64, c_char_p, c_char_p, err]),
        "whet_session_set_adapter": (status, [u64, c_char_p, err]),
        "whet_session_embedding_dim": (status, [u64, POINTER(c_size_t), err]),
        "whet_session_embed": (status, [u64, POINTER(c_char_p), c_size_t, c_int32,
                                        POINTER(c_float), c_size_t, err]),
        "whet_session_free": (status, [u64]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


class WhetError(Exception):
    pass


def check(lib, what, call):
    """Runs `call(err_pointer)`; raises with the library's message unless it returned OK."""
    err = c_uint64(0)
    status = call(byref(err))
    if status != OK:
        message = lib.whet_error_message(err.value) if err.value else None
        lib.whet_error_free(err.value)
        raise WhetError(f"{what}: {lib.whet_status_name(status).decode()}: "
                        f"{message.decode() if message else '(no message)'}")


def recipe(out, quick):
    return json.dumps({
        "model": {"path": "asset:all-minilm-l6-v2", "task": "classification"},
        "data": {"train": ["asset:uci-sentiment/amazon.json"], "text_field": "text",
                 "label_field": "class", "skip_bad_records": True,
                 "max_records": 32 if quick else 400, "validation_ratio": 0.2,
                 "max_seq_len": 24 if quick else 64},
        "method": {"kind": "lora", "r": 8, "lora_alpha": 16,
                   "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        "training": {"learning_rate": 3e-3, "epochs": 1 if quick else 3,
                     "batch_size": 8 if quick else 16,
                     "warmup_ratio": 0.1, "seed": 42},
        "output": {"dir": os.path.join(out, "first")},
    })


def main():
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} OUTPUT_DIR [--quick]")
    out, quick = sys.argv[1], "--quick" in sys.argv[2:]
    lib = load_library()
    print(f"whetstone {lib.whet_version().decode()} (C ABI {lib.whet_abi_version()}, "
          f"plugin contract {lib.whet_contract_version().decode()})")
    assert lib.whet_abi_version() == ABI_VERSION, "library and this script disagree on the ABI"
    check(lib, "log", lambda e: lib.whet_log_init(b"warn", e))

    session = c_uint64(0)
    check(lib, "create session", lambda e: lib.whet_session_create(
        ABI_VERSION, recipe(out, quick).encode(), byref(session), e))
    s = session.value

    cancel_at = {"step": 0}
    heard = []

    @ProgressFn
    def on_progress(progress, _user_data):
        p = progress.contents
        heard.append(p.step)
        print(f"  step {p.step:3}/{p.total_steps}  loss {p.loss:.4f}  "
              f"{p.tokens_per_second:.0f} tokens/s", flush=True)
        return 1 if cancel_at["step"] and p.step >= cancel_at["step"] else 0

    report = TrainReport()
    print("training (LoRA r=8 on query/value):")
    check(lib, "train", lambda e: lib.whet_session_train(
        s, 2 if quick else 0, on_progress, None, byref(report), e))
    print(f"trained {report.step} of {report.total_steps} steps, "
          f"{report.seconds_per_step:.3f} s/step")
    assert len(heard) == report.step, (heard, report.step)

    ev = EvalReport()
    check(lib, "evaluate", lambda e: lib.whet_session_evaluate(s, byref(ev), e))
    print(f"held-out accuracy {ev.accuracy:.4f} (loss {ev.loss:.4f}, {ev.examples} examples)")
    if not quick:
        assert report.finished == 1
        assert ev.accuracy >= MIN_ACCURACY, f"accuracy {ev.accuracy:.4f} < {MIN_ACCURACY}"

    adapter = os.path.join(out, "adapter")
    check(lib, "save adapter", lambda e: lib.whet_session_save_adapter(s, adapter.encode(), e))
    assert os.path.getsize(os.path.join(adapter, "adapter_model.safetensors")) > 0
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == 8, config
    check(lib, "load adapter",
          lambda e: lib.whet_session_load_adapter(s, adapter.encode(), b"saved", e))
    again = EvalReport()
    check(lib, "evaluate loaded", lambda e: lib.whet_session_evaluate(s, byref(again), e))
    print(f"loaded adapter: accuracy {again.accuracy:.4f}")
    assert again.accuracy == ev.accuracy and abs(again.loss - ev.loss) < 1e-4
    check(lib, "set adapter", lambda e: lib.whet_session_set_adapter(s, b"default", e))

    dim = c_size_t(0)
    check(lib, "embedding dim", lambda e: lib.whet_session_embedding_dim(s, byref(dim), e))
    texts = [b"A wonderful film, I loved it.", b"An absolutely great movie.",
             b"The battery died after a day."]
    text_array = (c_char_p * len(texts))(*texts)
    vectors = (c_float * (len(texts) * dim.value))()
    check(lib, "embed", lambda e: lib.whet_session_embed(
        s, text_array, len(texts), 1, vectors, len(vectors), e))
    rows = [vectors[i * dim.value:(i + 1) * dim.value] for i in range(len(texts))]
    cos = lambda a, b: sum(x * y for x, y in zip(a, b))
    assert math.isclose(cos(rows[0], rows[0]), 1.0, rel_tol=1e-4)
    print(f"embeddings of {dim.value} values: cosine(similar) {cos(rows[0], rows[1]):.3f}, "
          f"cosine(unrelated) {cos(rows[0], rows[2]):.3f}")
    assert cos(rows[0], rows[1]) > cos(rows[0], rows[2])

    second = json.dumps({"output": {"dir": os.path.join(out, "second")},
                         "training": {"seed": 7}})
    check(lib, "configure", lambda e: lib.whet_session_configure(s, second.encode(), e))
    cancel_at["step"] = 3
    print("second run, cancelled at step 3:")
    err = c_uint64(0)
    status = lib.whet_session_train(s, 0, on_progress, None, byref(report), byref(err))
    assert status == CANCELLED, lib.whet_status_name(status)
    assert report.step == 3 and report.finished == 0
    cancel_at["step"] = 0
    print(f"cancelled at step {report.step}; continuing for 2 steps:")
    check(lib, "continue", lambda e: lib.whet_session_train(
        s, 2, on_progress, None, byref(report), e))
    assert report.step == min(5, report.total_steps), report.step

    assert lib.whet_session_free(s) == OK
    assert lib.whet_session_free(s) == INVALID_HANDLE
    status = lib.whet_session_evaluate(s, byref(ev), byref(err))
    assert status == INVALID_HANDLE and err.value
    print(f"freed session: {lib.whet_error_message(err.value).decode()}")
    lib.whet_error_free(err.value)
    print("python-ctypes: all checks passed")


if __name__ == "__main__":
    main()
