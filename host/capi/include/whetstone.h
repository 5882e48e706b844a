/*
 * Whetstone: parameter-efficient fine-tuning, embedded through a C ABI.
 *
 * Link with -lwhetstone (libwhetstone.so or libwhetstone.a). Every object is an opaque 64-bit
 * handle (0 is never valid); a freed or stale handle is reported as
 * WHET_STATUS_INVALID_HANDLE, never undefined behaviour. Every fallible call returns a
 * WhetStatus and, when `err` is not NULL and the call failed, stores an error handle there
 * (read it with whet_error_message, free it with whet_error_free).
 *
 * Threads: every function may be called from any thread. A session serves one call at a time:
 * a call on a session that another call is using (another thread, or its own progress
 * callback) fails with WHET_STATUS_BUSY, except whet_session_cancel, which works at any time.
 * Strings are UTF-8 and NUL-terminated.
 */

#ifndef WHETSTONE_H
#define WHETSTONE_H

/* Generated from whetstone-capi's src/ by cbindgen (host/capi/tests/c_header.rs). Do not edit. */

#include <stddef.h>
#include <stdint.h>

// Version of the C ABI this header describes. Pass it to `whet_session_create`; it changes
// whenever a function, struct or enum of the header changes incompatibly.
#define WHETSTONE_ABI_VERSION 1

// What a call did. Every fallible function returns one; `WHET_STATUS_OK` is 0.
typedef enum WhetStatus {
  // The call succeeded.
  WHET_STATUS_OK = 0,
  // Training stopped because the progress callback returned non-zero or
  // `whet_session_cancel` was called; the next `whet_session_train` continues the run.
  WHET_STATUS_CANCELLED = 1,
  // An argument was NULL, not UTF-8 or out of range (the message names it).
  WHET_STATUS_INVALID_ARGUMENT = 2,
  // A handle was 0, freed, stale, forged or of another kind.
  WHET_STATUS_INVALID_HANDLE = 3,
  // The program was compiled against another `whetstone.h` than this library's.
  WHET_STATUS_VERSION_MISMATCH = 4,
  // A recipe, configuration, model, dataset or adapter file is invalid.
  WHET_STATUS_CONFIG = 5,
  // A plugin could not be found or loaded, or failed.
  WHET_STATUS_PLUGIN = 6,
  // Reading or writing a file failed.
  WHET_STATUS_IO = 7,
  // The session is in use by another call (another thread, or its own progress callback).
  WHET_STATUS_BUSY = 8,
  // The caller's buffer is too small (the message says how large it must be).
  WHET_STATUS_BUFFER_TOO_SMALL = 9,
  // An internal error (a panic) was caught; the session it happened in is unusable.
  WHET_STATUS_PANIC = 10,
  // Any other failure (tensor errors, non-finite loss, ...).
  WHET_STATUS_FAILED = 11,
} WhetStatus;

// An error handle: read with `whet_error_message`, free with `whet_error_free`. 0 is none.
typedef uint64_t WhetError;

// How to generate (`whet_generate_options_default` gives the defaults).
typedef struct WhetGenerateOptions {
  // Most tokens to generate.
  uint32_t max_new_tokens;
  // Sampling temperature; 0 decodes greedily.
  double temperature;
  // Nucleus sampling mass (1 keeps every token).
  double top_p;
  // Seed of the sampler: same seed, same text.
  uint64_t seed;
  // Non-zero: the prompt is a user turn of the model's chat template.
  int32_t chat;
} WhetGenerateOptions;

// A session handle: one loaded model with its method, data and adapters. Free it with
// `whet_session_free`.
typedef uint64_t WhetSession;

// Figures of an evaluation on the session's validation examples. Figures that do not apply
// are NaN.
typedef struct WhetEvalReport {
  // Mean loss (per example for classification, per predicted token for language models).
  double loss;
  // Share of examples classified right (classification).
  double accuracy;
  // `exp(loss)` (language models).
  double perplexity;
  // Number of examples evaluated.
  uint64_t examples;
} WhetEvalReport;

// A text handle: read with `whet_text_data`, free with `whet_text_free`.
typedef uint64_t WhetText;

// One optimizer step, as the progress callback hears it.
typedef struct WhetProgress {
  // The step just taken (1-based, counted over the whole run).
  uint64_t step;
  // Steps the whole run takes.
  uint64_t total_steps;
  // Mean training loss of the step.
  double loss;
  // Learning rate of the step.
  double learning_rate;
  // Gradient norm before clipping.
  double grad_norm;
  // Training tokens per second over the step.
  double tokens_per_second;
} WhetProgress;

// Called after every optimizer step with the step's figures and the caller's `user_data`, on
// the thread that called `whet_session_train`. Return 0 to go on, non-zero to cancel (the
// run stops after this step and can be continued). It may call `whet_session_cancel`, but no
// other function on the same session (that returns `WHET_STATUS_BUSY`).
typedef int32_t (*WhetProgressFn)(const struct WhetProgress *progress, void *user_data);

// What a `whet_session_train` call did. Figures that do not apply are NaN.
typedef struct WhetTrainReport {
  // 1 when the run reached its last step, 0 when it paused (step budget) or was cancelled.
  int32_t finished;
  // Steps the run has taken so far (over all calls).
  uint64_t step;
  // Steps the whole run takes.
  uint64_t total_steps;
  // Loss of the last step taken.
  double last_loss;
  // Validation loss of the run's latest evaluation.
  double eval_loss;
  // Validation accuracy of the run's latest evaluation (classification).
  double eval_accuracy;
  // Mean seconds per optimizer step in this call.
  double seconds_per_step;
  // Training tokens per second in this call.
  double tokens_per_second;
} WhetTrainReport;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The ABI version of the library (compare with the header's `WHETSTONE_ABI_VERSION`).
uint32_t whet_abi_version(void);

// The library's version (`"0.1.0"`); the string is static.
const char *whet_version(void);

// The plugin contract version the library's host speaks (`"0.2"`): plugins must be built
// with an SDK of the same contract. The string is static.
const char *whet_contract_version(void);

// Sends the library's log (model loading, training steps, evaluations) to stderr, filtered
// by `filter` in `RUST_LOG` syntax (NULL: `"info"`). The first call installs the logger;
// later calls change nothing and return `WHET_STATUS_OK`.
//
// # Safety
// `filter` is NULL or NUL-terminated; `err` is NULL or writable.
enum WhetStatus whet_log_init(const char *filter, WhetError *err);

// Greedy decoding of up to 64 tokens, seed 0, no chat template.
struct WhetGenerateOptions whet_generate_options_default(void);

// Evaluates the active adapter on the validation examples of the session's data.
//
// # Safety
// `out_report` and `err` are NULL or writable.
enum WhetStatus whet_session_evaluate(WhetSession session,
                                      struct WhetEvalReport *out_report,
                                      WhetError *err);

// Generates a continuation of `prompt` (a causal language model) with the active adapter and
// stores the generated text (without the prompt) as a text handle in `*out_text`; free it
// with `whet_text_free`. `options` may be NULL for the defaults.
//
// # Safety
// `prompt` is NULL or NUL-terminated; `options` is NULL or readable; `out_text` and `err` are
// NULL or writable.
enum WhetStatus whet_session_generate(WhetSession session,
                                      const char *prompt,
                                      const struct WhetGenerateOptions *options,
                                      WhetText *out_text,
                                      WhetError *err);

// Stores the width of the session's sentence embeddings in `*out_dim` (encoder models).
//
// # Safety
// `out_dim` and `err` are NULL or writable.
enum WhetStatus whet_session_embedding_dim(WhetSession session, uintptr_t *out_dim, WhetError *err);

// Embeds `count` texts with the active adapter (the model's pooling, evaluation mode) into
// `out`, row after row: `out_len` must be at least `count × whet_session_embedding_dim`.
// Non-zero `normalize` scales each row to unit length (as sentence-transformers does).
//
// # Safety
// `texts` is NULL or points to `count` NUL-terminated strings; `out` is NULL or writable for
// `out_len` floats; `err` is NULL or writable.
enum WhetStatus whet_session_embed(WhetSession session,
                                   const char *const *texts,
                                   uintptr_t count,
                                   int32_t normalize,
                                   float *out,
                                   uintptr_t out_len,
                                   WhetError *err);

// Creates a session from a recipe: the TOML text of a `whet train` recipe, or the same as
// JSON (text starting with `{`). Loads the model and attaches the method; the data is read at
// the first train or evaluate. Relative paths are relative to the working directory.
//
// Pass `WHETSTONE_ABI_VERSION` as `abi_version`: a program compiled against another header
// gets `WHET_STATUS_VERSION_MISMATCH`. On success the handle is stored in `*out_session`.
//
// # Safety
// `recipe` is NULL or a NUL-terminated string; `out_session` is NULL or writable; `err` is
// NULL or writable.
enum WhetStatus whet_session_create(uint32_t abi_version,
                                    const char *recipe,
                                    WhetSession *out_session,
                                    WhetError *err);

// Creates a session from parts: the model at `model_path` (a `.gguf` file, a Hugging Face
// directory, or `asset:NAME`), and the method plugin `method` (an id such as `"lora"`, or
// `"full"`/`"partial"`; NULL for none: the frozen base model, to load adapters onto) with its
// configuration `method_config` (TOML or JSON with PEFT's field names; NULL for the defaults).
// The session has no data until `whet_session_configure` gives it a `[data]` section.
//
// # Safety
// String arguments are NULL or NUL-terminated; `out_session` and `err` are NULL or writable.
enum WhetStatus whet_session_create_from_parts(uint32_t abi_version,
                                               const char *model_path,
                                               const char *method,
                                               const char *method_config,
                                               WhetSession *out_session,
                                               WhetError *err);

// Changes the session's `[data]`, `[training]` and/or `[output]` sections: `config` is TOML
// or JSON whose tables are written field by field over the current ones (for example
// `{"training": {"max_steps": 20}}`). The next `whet_session_train` starts a new run.
//
// # Safety
// `config` is NULL or NUL-terminated; `err` is NULL or writable.
enum WhetStatus whet_session_configure(WhetSession session, const char *config, WhetError *err);

// Replaces the session's own method with plugin `method` (or `"full"`/`"partial"`) configured
// by `method_config` (TOML/JSON, NULL for defaults), and makes it the active adapter.
//
// # Safety
// String arguments are NULL or NUL-terminated; `err` is NULL or writable.
enum WhetStatus whet_session_attach_method(WhetSession session,
                                           const char *method,
                                           const char *method_config,
                                           WhetError *err);

// Removes the session's own method: the base model computes and nothing trains until another
// method is attached.
//
// # Safety
// `err` is NULL or writable.
enum WhetStatus whet_session_detach_method(WhetSession session, WhetError *err);

// Loads the PEFT adapter in directory `dir` (`adapter_config.json` +
// `adapter_model.safetensors`, from Whetstone or Python PEFT) under `name` and makes it the
// active adapter. Its method plugin must be installed. Only the session's own method
// (`"default"`) trains; loaded adapters evaluate, generate and embed.
//
// # Safety
// String arguments are NULL or NUL-terminated; `err` is NULL or writable.
enum WhetStatus whet_session_load_adapter(WhetSession session,
                                          const char *dir,
                                          const char *name,
                                          WhetError *err);

// Makes adapter `name` the one that computes: a loaded adapter's name, `"default"` for the
// session's own method, or NULL for the base model alone.
//
// # Safety
// `name` is NULL or NUL-terminated; `err` is NULL or writable.
enum WhetStatus whet_session_set_adapter(WhetSession session, const char *name, WhetError *err);

// Unloads the loaded adapter `name` (the base model computes if it was the active one).
//
// # Safety
// `name` is NULL or NUL-terminated; `err` is NULL or writable.
enum WhetStatus whet_session_remove_adapter(WhetSession session, const char *name, WhetError *err);

// Saves the active adapter to directory `dir` in PEFT's format (Python PEFT loads it with
// `PeftModel.from_pretrained`).
//
// # Safety
// `dir` is NULL or NUL-terminated; `err` is NULL or writable.
enum WhetStatus whet_session_save_adapter(WhetSession session, const char *dir, WhetError *err);

// Writes the model with the active adapter merged into its weights to directory `dir` (a
// Hugging Face model: f32 safetensors, `config.json`, tokenizer). The session keeps its
// unmerged adapter.
//
// # Safety
// `dir` is NULL or NUL-terminated; `err` is NULL or writable.
enum WhetStatus whet_session_merge(WhetSession session, const char *dir, WhetError *err);

// Asks a `whet_session_train` in progress on this session to stop after its current step
// (it then returns `WHET_STATUS_CANCELLED`). Callable from any thread, also while the session
// is busy.
enum WhetStatus whet_session_cancel(WhetSession session);

// Frees `session` and everything it holds (model, plugins, adapters). A training call in
// progress on another thread is cancelled and the memory is released when it returns.
// `WHET_STATUS_INVALID_HANDLE` for a handle that is not a live session (freed twice); 0 is
// accepted and ignored.
enum WhetStatus whet_session_free(WhetSession session);

// The status of error `err` (`WHET_STATUS_INVALID_HANDLE` when `err` is not a live error).
enum WhetStatus whet_error_status(WhetError err);

// The message of error `err`: what was wrong and how to fix it. The string stays valid until
// `whet_error_free(err)`. NULL when `err` is not a live error.
const char *whet_error_message(WhetError err);

// Frees error `err`. Returns `WHET_STATUS_INVALID_HANDLE` for a handle that is not a live
// error (freed twice, or never an error); 0 is accepted and ignored.
enum WhetStatus whet_error_free(WhetError err);

// The name of status code `status` (`"WHET_STATUS_OK"`, ...), or `"WHET_STATUS_UNKNOWN"`. The
// string is static.
const char *whet_status_name(int32_t status);

// The NUL-terminated UTF-8 text of `text`, valid until `whet_text_free(text)`; NULL when
// `text` is not a live text handle.
const char *whet_text_data(WhetText text);

// Frees `text`. `WHET_STATUS_INVALID_HANDLE` when it is not a live text handle (freed twice);
// 0 is accepted and ignored.
enum WhetStatus whet_text_free(WhetText text);

// Trains the session's own method for up to `max_steps` optimizer steps (0: to the end of the
// run). A paused or cancelled run continues exactly where it stopped; after a finished run the
// next call starts a new run from the current weights. Checkpoints and metrics go to the
// recipe's `output.dir`. `progress` (may be NULL) hears every step with `user_data`; `report`
// (may be NULL) receives the outcome. Returns `WHET_STATUS_OK` when the run finished or used
// up `max_steps`, `WHET_STATUS_CANCELLED` when it was cancelled.
//
// # Safety
// `progress` is NULL or a function that follows `WhetProgressFn`'s contract; `report` and
// `err` are NULL or writable.
enum WhetStatus whet_session_train(WhetSession session,
                                   uint64_t max_steps,
                                   WhetProgressFn progress,
                                   void *user_data,
                                   struct WhetTrainReport *report,
                                   WhetError *err);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* WHETSTONE_H */
