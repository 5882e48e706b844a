//! The model-level hook semantics, proven without plugins by [`ModelHook`]s written here:
//!
//! - a key/value prefix equal to what the model itself computes for tokens `[a b]` makes
//!   `[c d e]` give exactly the logits those tokens get after `[a b]` (prefix positions count as
//!   cached, inputs start after them, the prefix is not rotated again), with and without a KV
//!   cache;
//! - virtual tokens equal to the input embeddings of `[a b]` do the same (they get positions
//!   `0..2`, the inputs follow, and they are dropped from the output);
//! - the same two equivalences on a BERT encoder (bidirectional attention, learned positions);
//! - hooks returning the wrong shapes are refused with errors naming the expected shape.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use whetstone_host::model::bert::{BertConfig, BertForSequenceClassification};
use whetstone_host::model::generate::KvCache;
use whetstone_host::model::hooks::{LinearHook, ModelHook};
use whetstone_host::model::llama::Llama;
use whetstone_host::model::load::Pooling;
use whetstone_host::model::{Mode, Model};
use whetstone_host::plugin::conformance::tiny_config;

/// Tokens `[a b c d e]`; `[a b]` become the prefix or the virtual tokens.
const TOKENS: [u32; 5] = [3, 17, 4, 29, 11];
/// How many of them move into the hook.
const MOVED: usize = 2;
/// Largest |Δ| accepted between the hooked and the plain computation.
const TOLERANCE: f32 = 1e-5;

fn ids(tokens: &[u32]) -> Tensor {
    Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu).unwrap()
}

fn ones(n: usize) -> Tensor {
    Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Fixed keys and values `[1, kv_heads, prefix, head_dim]` per layer, repeated over the batch.
#[derive(Debug)]
struct FixedPrefix(Vec<(Tensor, Tensor)>);

impl ModelHook for FixedPrefix {
    fn embeddings(
        &self,
        _embeddings: &Tensor,
        _mask: &Tensor,
    ) -> whetstone_host::Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    fn attention_prefix(
        &self,
        layer: usize,
        batch: usize,
    ) -> whetstone_host::Result<Option<(Tensor, Tensor)>> {
        Ok(self.0.get(layer).map(|(k, v)| {
            let expand = |t: &Tensor| t.repeat((batch, 1, 1, 1)).unwrap();
            (expand(k), expand(v))
        }))
    }
}

/// Fixed virtual tokens `[virtual, hidden]` in front of every row, mask ones.
#[derive(Debug)]
struct FixedTokens(Tensor);

impl ModelHook for FixedTokens {
    fn embeddings(
        &self,
        embeddings: &Tensor,
        mask: &Tensor,
    ) -> whetstone_host::Result<Option<(Tensor, Tensor)>> {
        let (batch, _, hidden) = embeddings.dims3()?;
        let n = self.0.dim(0)?;
        let tokens = self.0.unsqueeze(0)?.broadcast_as((batch, n, hidden))?;
        let ones = Tensor::ones((batch, n), mask.dtype(), mask.device())?;
        Ok(Some((
            Tensor::cat(&[&tokens, embeddings], 1)?,
            Tensor::cat(&[&ones, mask], 1)?,
        )))
    }

    fn attention_prefix(
        &self,
        _layer: usize,
        _batch: usize,
    ) -> whetstone_host::Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
}

/// Rows `tokens` of the embedding matrix `name` of `model`.
fn embedding_rows(model: &dyn Model, name: &str, tokens: &[u32]) -> Tensor {
    let weight = model.params().get(name).unwrap().tensor();
    weight
        .index_select(
            &Tensor::from_slice(tokens, tokens.len(), &Device::Cpu).unwrap(),
            0,
        )
        .unwrap()
}

fn llama() -> Llama {
    Llama::random(&tiny_config(), &Device::Cpu, 0x5eed).unwrap()
}

/// The logits of `[c d e]` decoded one token at a time with a KV cache.
fn decode_one_by_one(model: &Llama, tokens: &[u32]) -> Tensor {
    let lm = model.as_causal_lm().unwrap();
    let mut cache = lm.new_cache();
    let parts: Vec<Tensor> = tokens
        .iter()
        .map(|&t| lm.forward_cached(&ids(&[t]), &mut cache).unwrap())
        .collect();
    Tensor::cat(&parts, 1).unwrap()
}

/// The keys and values a cache holds for every layer (`[1, kv_heads, len, head_dim]`).
fn cached_keys_values(
    cache: &KvCache,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Vec<(Tensor, Tensor)> {
    let len = cache.seq_len();
    let mut probe = cache.clone();
    let pad = Tensor::zeros((1, kv_heads, 1, head_dim), DType::F32, &Device::Cpu).unwrap();
    (0..layers)
        .map(|layer| {
            let (k, v) = probe.append(layer, &pad, &pad).unwrap();
            (k.narrow(2, 0, len).unwrap(), v.narrow(2, 0, len).unwrap())
        })
        .collect()
}

#[test]
fn a_prefix_of_cached_keys_and_values_continues_the_sequence() {
    let model = llama();
    let c = tiny_config();
    let full = model.forward(&ids(&TOKENS), &ones(5), Mode::Eval).unwrap();
    let want = full.narrow(1, MOVED, 5 - MOVED).unwrap();

    let lm = model.as_causal_lm().unwrap();
    let mut cache = lm.new_cache();
    lm.forward_cached(&ids(&TOKENS[..MOVED]), &mut cache)
        .unwrap();
    let prefix = cached_keys_values(&cache, 2, c.num_key_value_heads, c.head_dim());
    model
        .forward_context()
        .set_model_hook(Some(Arc::new(FixedPrefix(prefix))));

    let rest = &TOKENS[MOVED..];
    let hooked = model
        .forward(&ids(rest), &ones(rest.len()), Mode::Eval)
        .unwrap();
    assert!(max_abs_diff(&hooked, &want) < TOLERANCE);
    // Cached decoding asks once, on its first call, and keeps the prefix.
    let decoded = decode_one_by_one(&model, rest);
    assert!(max_abs_diff(&decoded, &want) < TOLERANCE);
    // Without the hook the same tokens give other logits: the prefix is what made the difference.
    model.forward_context().set_model_hook(None);
    let plain = model
        .forward(&ids(rest), &ones(rest.len()), Mode::Eval)
        .unwrap();
    assert!(max_abs_diff(&plain, &want) > 1e-3);
}

#[test]
fn virtual_tokens_equal_to_real_embeddings_continue_the_sequence() {
    let model = llama();
    let full = model.forward(&ids(&TOKENS), &ones(5), Mode::Eval).unwrap();
    let want = full.narrow(1, MOVED, 5 - MOVED).unwrap();
    let rows = embedding_rows(&model, "model.embed_tokens.weight", &TOKENS[..MOVED]);
    model
        .forward_context()
        .set_model_hook(Some(Arc::new(FixedTokens(rows))));

    let rest = &TOKENS[MOVED..];
    let hooked = model
        .forward(&ids(rest), &ones(rest.len()), Mode::Eval)
        .unwrap();
    assert_eq!(hooked.dims(), want.dims(), "virtual tokens are dropped");
    assert!(max_abs_diff(&hooked, &want) < TOLERANCE);
    let decoded = decode_one_by_one(&model, rest);
    assert!(max_abs_diff(&decoded, &want) < TOLERANCE);
    model.forward_context().set_model_hook(None);
    let plain = model
        .forward(&ids(rest), &ones(rest.len()), Mode::Eval)
        .unwrap();
    assert!(max_abs_diff(&plain, &want) > 1e-3);
}

#[test]
fn padded_rows_keep_their_virtual_tokens() {
    // Two rows, the second right-padded: each row's real tokens see the virtual tokens.
    let model = llama();
    let rows = embedding_rows(&model, "model.embed_tokens.weight", &TOKENS[..MOVED]);
    model
        .forward_context()
        .set_model_hook(Some(Arc::new(FixedTokens(rows))));
    let batch = Tensor::from_slice(&[4u32, 29, 11, 4, 29, 0], (2, 3), &Device::Cpu).unwrap();
    let mask = Tensor::from_slice(&[1u32, 1, 1, 1, 1, 0], (2, 3), &Device::Cpu).unwrap();
    let out = model.forward(&batch, &mask, Mode::Eval).unwrap();
    model.forward_context().set_model_hook(None);
    let full = model.forward(&ids(&TOKENS), &ones(5), Mode::Eval).unwrap();
    let first = out.narrow(0, 0, 1).unwrap();
    assert!(max_abs_diff(&first, &full.narrow(1, 2, 3).unwrap()) < TOLERANCE);
    let second = out.narrow(0, 1, 1).unwrap().narrow(1, 0, 2).unwrap();
    assert!(max_abs_diff(&second, &full.narrow(1, 2, 2).unwrap()) < TOLERANCE);
}

fn bert() -> BertForSequenceClassification {
    let json = serde_json::json!({
        "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 32, "max_position_embeddings": 24, "pad_token_id": 0
    });
    let config = BertConfig::from_json(&json, Path::new("config.json")).unwrap();
    BertForSequenceClassification::random(&config, 2, Pooling::Mean, &Device::Cpu, 9).unwrap()
}

#[test]
fn bert_virtual_tokens_equal_to_real_embeddings_give_the_same_hidden_states() {
    let model = bert();
    let full = model.encode(&ids(&TOKENS), &ones(5), Mode::Eval).unwrap();
    let rows = embedding_rows(
        &model,
        "embeddings.word_embeddings.weight",
        &TOKENS[..MOVED],
    );
    model
        .forward_context()
        .set_model_hook(Some(Arc::new(FixedTokens(rows))));
    let rest = &TOKENS[MOVED..];
    let hooked = model
        .encode(&ids(rest), &ones(rest.len()), Mode::Eval)
        .unwrap();
    let want = full.narrow(1, MOVED, 3).unwrap();
    assert!(max_abs_diff(&hooked, &want) < TOLERANCE);
    model.forward_context().set_model_hook(None);
    let plain = model
        .encode(&ids(rest), &ones(rest.len()), Mode::Eval)
        .unwrap();
    assert!(max_abs_diff(&plain, &want) > 1e-3);
}

/// Records the output of the linear it wraps (BERT's key and value projections).
#[derive(Debug, Default)]
struct Capture(Mutex<Option<Tensor>>);

impl LinearHook for Capture {
    fn forward(&self, _x: &Tensor, base_out: &Tensor) -> whetstone_host::Result<Tensor> {
        *self.0.lock().unwrap() = Some(base_out.clone());
        Ok(base_out.clone())
    }
}

#[test]
fn bert_prefix_of_its_own_keys_and_values_gives_the_same_hidden_states() {
    // Attention is bidirectional, so the keys and values of [a b] are taken from the full
    // forward of [a b c d e]; given to [c d e] as a prefix (positions starting after it), every
    // query of c d e attends to exactly what it attended to in the full forward.
    let model = bert();
    let (heads, head_dim) = (4, 4);
    let mut captures = Vec::new();
    for layer in 0..2 {
        let mut pair = Vec::new();
        for which in ["key", "value"] {
            let name = format!("encoder.layer.{layer}.attention.self.{which}");
            let linear = model
                .linears()
                .into_iter()
                .find(|l| l.name == name)
                .unwrap();
            let capture = Arc::new(Capture::default());
            linear.set_hook(Some(capture.clone()));
            pair.push(capture);
        }
        captures.push(pair);
    }
    let full = model.encode(&ids(&TOKENS), &ones(5), Mode::Eval).unwrap();
    let heads_of = |c: &Capture| {
        let out = c.0.lock().unwrap().clone().unwrap();
        out.reshape((1, 5, heads, head_dim))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .narrow(2, 0, MOVED)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let prefix: Vec<(Tensor, Tensor)> = captures
        .iter()
        .map(|pair| (heads_of(&pair[0]), heads_of(&pair[1])))
        .collect();
    for linear in model.linears() {
        linear.set_hook(None);
    }
    model
        .forward_context()
        .set_model_hook(Some(Arc::new(FixedPrefix(prefix))));
    let rest = &TOKENS[MOVED..];
    let hooked = model
        .encode(&ids(rest), &ones(rest.len()), Mode::Eval)
        .unwrap();
    let want = full.narrow(1, MOVED, 3).unwrap();
    assert!(max_abs_diff(&hooked, &want) < TOLERANCE);
    model.forward_context().set_model_hook(None);
    let plain = model
        .encode(&ids(rest), &ones(rest.len()), Mode::Eval)
        .unwrap();
    assert!(max_abs_diff(&plain, &want) > 1e-3);
}

/// A hook returning whatever it was built with.
#[derive(Debug)]
struct Returns {
    embeddings: Option<(Vec<usize>, Vec<usize>)>,
    prefix: Vec<Option<Vec<usize>>>,
}

impl ModelHook for Returns {
    fn embeddings(
        &self,
        _embeddings: &Tensor,
        _mask: &Tensor,
    ) -> whetstone_host::Result<Option<(Tensor, Tensor)>> {
        Ok(self.embeddings.as_ref().map(|(e, m)| {
            (
                Tensor::zeros(e.as_slice(), DType::F32, &Device::Cpu).unwrap(),
                Tensor::ones(m.as_slice(), DType::F32, &Device::Cpu).unwrap(),
            )
        }))
    }

    fn attention_prefix(
        &self,
        layer: usize,
        _batch: usize,
    ) -> whetstone_host::Result<Option<(Tensor, Tensor)>> {
        Ok(self.prefix.get(layer).cloned().flatten().map(|shape| {
            let t = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
            (t.clone(), t)
        }))
    }
}

fn error_of(hook: Returns) -> String {
    let model = llama();
    model.forward_context().set_model_hook(Some(Arc::new(hook)));
    let err = model
        .forward(&ids(&TOKENS[..3]), &ones(3), Mode::Eval)
        .unwrap_err();
    err.to_string()
}

#[test]
fn wrong_shapes_are_refused_naming_the_expected_shape() {
    // Embeddings of the wrong width, and a mask that does not cover the virtual tokens.
    let err = error_of(Returns {
        embeddings: Some((vec![1, 5, 16], vec![1, 5])),
        prefix: vec![],
    });
    assert!(err.contains("[1, virtual + 3, 32]"), "{err}");
    let err = error_of(Returns {
        embeddings: Some((vec![1, 5, 32], vec![1, 3])),
        prefix: vec![],
    });
    assert!(err.contains("[1, virtual + 3]"), "{err}");
    // A prefix with the query heads instead of the key/value heads (grouped-query attention).
    let err = error_of(Returns {
        embeddings: None,
        prefix: vec![Some(vec![1, 4, 2, 8]), Some(vec![1, 4, 2, 8])],
    });
    assert!(
        err.contains("[1, 2, 2, 8]") && err.contains("layer 0"),
        "{err}"
    );
    // A prefix for some layers only, and prefixes of different lengths.
    let err = error_of(Returns {
        embeddings: None,
        prefix: vec![Some(vec![1, 2, 2, 8]), None],
    });
    assert!(err.contains("every layer"), "{err}");
    let err = error_of(Returns {
        embeddings: None,
        prefix: vec![Some(vec![1, 2, 2, 8]), Some(vec![1, 2, 3, 8])],
    });
    assert!(err.contains("same prefix length"), "{err}");
}
