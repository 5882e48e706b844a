/* The Whetstone native plugin ABI: the C form of the WIT package sdk/wit/0.2.0. */

#ifndef WHETSTONE_PLUGIN_H
#define WHETSTONE_PLUGIN_H

/* Generated from whetstone-sdk's src/abi.rs by cbindgen (sdk/tests/c_header.rs). Do not edit. */

#include <stddef.h>
#include <stdint.h>

// The native vtable's version. Bumped with every incompatible change (a new WIT folder).
#define ABI_VERSION 2

// Status of a call: [`WS_OK`] or [`WS_ERROR`].
typedef int32_t WsStatus;

// A borrowed UTF-8 string.
typedef struct WsStr {
  // First byte (may be dangling when `len` is 0).
  const uint8_t *ptr;
  // Length in bytes.
  uintptr_t len;
} WsStr;

// A parameter initialisation ([`crate::Init`]): `kind` 0 zeros, 1 ones, 2 constant(`a`),
// 3 normal(mean `a`, std `b`), 4 uniform(`a`, `b`), 5 kaiming-uniform(`a`), 6 from-tensor(`tensor`).
typedef struct WsInit {
  // Which initialisation.
  uint32_t kind;
  // First argument.
  double a;
  // Second argument.
  double b;
  // Source tensor handle for from-tensor.
  uint64_t tensor;
} WsInit;

// The functions the host offers a native plugin (WIT interface `host`).
typedef struct WsHostApi {
  // [`ABI_VERSION`] of the host.
  uint32_t abi_version;
  // `size_of::<WsHostApi>()` as the host built it.
  uint32_t struct_size;
  // Host context, passed back as the first argument of every call.
  void *ctx;
  // The message of the last failed host call.
  struct WsStr (*last_error)(void *ctx);
  // `tensor-op`.
  WsStatus (*tensor_op)(void *ctx,
                        uint32_t op,
                        const uint64_t *inputs,
                        uintptr_t n_inputs,
                        const int64_t *ints,
                        uintptr_t n_ints,
                        const double *floats,
                        uintptr_t n_floats,
                        uint64_t *out);
  // `shape`: `*dims` points to `*rank` host-owned values.
  WsStatus (*shape)(void *ctx, uint64_t t, const uint64_t **dims, uintptr_t *rank);
  // `dtype`: writes a [`crate::DType`] code.
  WsStatus (*dtype)(void *ctx, uint64_t t, uint32_t *out);
  // `to-vec`: `*data` points to `*len` host-owned values.
  WsStatus (*to_vec)(void *ctx, uint64_t t, const float **data, uintptr_t *len);
  // `from-vec`.
  WsStatus (*from_vec)(void *ctx,
                       const float *data,
                       uintptr_t len,
                       const uint64_t *shape,
                       uintptr_t rank,
                       uint64_t *out);
  // `release`.
  void (*release)(void *ctx, uint64_t t);
  // `add-param`.
  WsStatus (*add_param)(void *ctx,
                        struct WsStr module,
                        struct WsStr name,
                        const uint64_t *shape,
                        uintptr_t rank,
                        struct WsInit init,
                        uint64_t *out);
  // `param`.
  WsStatus (*param)(void *ctx, struct WsStr module, struct WsStr name, uint64_t *out);
  // `base-param`.
  WsStatus (*base_param)(void *ctx, struct WsStr name, uint64_t *out);
  // `grad`: `*present` 0 when the parameter got no gradient.
  WsStatus (*grad)(void *ctx, uint64_t t, uint32_t *present, uint64_t *out);
  // `mode`: 0 train, 1 eval.
  uint32_t (*mode)(void *ctx);
  // `step`.
  uint64_t (*step)(void *ctx);
  // `log`.
  void (*log)(void *ctx, uint32_t level, struct WsStr message);
  // `file-count`.
  uint32_t (*file_count)(void *ctx);
  // `file-name`: `*out` is host-owned.
  WsStatus (*file_name)(void *ctx, uint32_t index, struct WsStr *out);
  // `read-file`: `*data` points to `*read` host-owned bytes.
  WsStatus (*read_file)(void *ctx,
                        uint32_t index,
                        uint64_t offset,
                        uint32_t len,
                        const uint8_t **data,
                        uintptr_t *read);
} WsHostApi;

// The base model's shape ([`crate::ModelInfo`]).
typedef struct WsModelInfo {
  // Architecture.
  struct WsStr architecture;
  // `causal-lm` or `sequence-classification`.
  struct WsStr task;
  // Hidden size.
  uint32_t hidden_size;
  // Transformer blocks.
  uint32_t num_layers;
  // Attention heads.
  uint32_t num_attention_heads;
  // Key/value heads.
  uint32_t num_key_value_heads;
  // Per-head dimension.
  uint32_t head_dim;
  // Vocabulary size.
  uint32_t vocab_size;
} WsModelInfo;

// A linear module ([`crate::LinearInfo`]).
typedef struct WsLinearInfo {
  // Module name.
  struct WsStr name;
  // Input features.
  uint32_t in_features;
  // Output features.
  uint32_t out_features;
  // 1 when the module has a bias.
  uint32_t has_bias;
  // Block index, or -1 when none.
  int64_t layer_index;
} WsLinearInfo;

// A lifecycle event ([`crate::Event`]): `kind` 0 train-start, 1 step-end(`step`, `loss`),
// 2 epoch-end(`step` holds the epoch), 3 train-end, 4 task-start(`task`),
// 5 task-gradient(`task`, `step` holds the example), 6 task-end(`task`).
typedef struct WsEvent {
  // Which event.
  uint32_t kind;
  // The task of the task events.
  uint32_t task;
  // Step, epoch or example.
  uint64_t step;
  // Loss for step-end.
  double loss;
} WsEvent;

// The functions a native plugin exports (WIT interface `plugin`). Optional results use a
// presence flag (`*present = 1`).
typedef struct WsPluginVtable {
  // [`ABI_VERSION`] the plugin was built for.
  uint32_t abi_version;
  // `size_of::<WsPluginVtable>()` as the plugin built it.
  uint32_t struct_size;
  // The message of the plugin's last failed call.
  struct WsStr (*last_error)(void);
  // `metadata` (JSON).
  struct WsStr (*metadata)(void);
  // `create-method`.
  WsStatus (*create_method)(struct WsStr config, uint32_t *out);
  // `init-model`.
  WsStatus (*init_model)(uint32_t instance, const struct WsModelInfo *model);
  // `select-linear`: `*selected` is 0 or 1.
  WsStatus (*select_linear)(uint32_t instance, const struct WsLinearInfo *linear, uint32_t *selected);
  // `init-linear`.
  WsStatus (*init_linear)(uint32_t instance, const struct WsLinearInfo *linear);
  // `forward-linear`.
  WsStatus (*forward_linear)(uint32_t instance,
                             struct WsStr module,
                             uint64_t x,
                             uint64_t base_out,
                             uint64_t *out);
  // `delta-weight`.
  WsStatus (*delta_weight)(uint32_t instance, struct WsStr module, uint32_t *present, uint64_t *out);
  // `forward-embeddings`.
  WsStatus (*forward_embeddings)(uint32_t instance,
                                 uint64_t embeddings,
                                 uint64_t attention_mask,
                                 uint32_t *present,
                                 uint64_t *out_embeddings,
                                 uint64_t *out_mask);
  // `attention-prefix`.
  WsStatus (*attention_prefix)(uint32_t instance,
                               uint32_t layer,
                               uint32_t batch,
                               uint32_t *present,
                               uint64_t *key,
                               uint64_t *value);
  // `trainable-base-params`: names in and out as JSON arrays of strings.
  WsStatus (*trainable_base_params)(uint32_t instance,
                                    struct WsStr names_json,
                                    struct WsStr *out_json);
  // `loss-term`.
  WsStatus (*loss_term)(uint32_t instance, uint32_t *present, uint64_t *out);
  // `on-event`.
  WsStatus (*on_event)(uint32_t instance, struct WsEvent event);
  // `task-gradient-examples`.
  WsStatus (*task_gradient_examples)(uint32_t instance, uint32_t *out);
  // `create-loss`.
  WsStatus (*create_loss)(struct WsStr config, uint32_t *out);
  // `compute-loss`: `has_teacher` 0 or 1.
  WsStatus (*compute_loss)(uint32_t instance,
                           uint64_t logits,
                           uint64_t labels,
                           uint64_t mask,
                           uint32_t has_teacher,
                           uint64_t teacher_logits,
                           uint64_t *out);
  // `create-loader`.
  WsStatus (*create_loader)(struct WsStr config, uint32_t *out);
  // `next-record`: `*present` 0 at the end of the data; `*out` is plugin-owned JSON.
  WsStatus (*next_record)(uint32_t instance, uint32_t *present, struct WsStr *out);
} WsPluginVtable;

// The type of [`ENTRY_SYMBOL`]: takes the host's table (valid for the life of the process) and
// returns the plugin's (likewise), or null when the plugin refuses the host's version.
typedef const struct WsPluginVtable *(*EntryFn)(const struct WsHostApi *host);

// Success.
#define WS_OK 0

// Failure; the message is available from `last_error`.
#define WS_ERROR 1

#endif  /* WHETSTONE_PLUGIN_H */
