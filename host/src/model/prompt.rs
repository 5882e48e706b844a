//! A model's side of the model-level [`ModelHook`]: virtual tokens prepended to the input
//! embeddings (prompt tuning, P-tuning) and key/value prefixes before every attention layer
//! (prefix tuning), applied once per sequence, before the first block.
//!
//! Conventions (those of Hugging Face PEFT):
//!
//! - virtual tokens are ordinary positions: they get position ids `0..virtual` and the input
//!   tokens follow them; the model drops them from its output, so logits and pooled
//!   representations stay aligned with the input tokens;
//! - a prefix behaves as `prefix` positions already in the key/value cache: the input tokens'
//!   positions start after it, every query attends to all of it, and it is not rotated;
//! - with a KV cache, the hook runs only on the first (prefill) call; the cache then holds the
//!   prefix and the virtual tokens, so later tokens see them without asking again.

use candle_core::{DType, Tensor};

use super::hooks::ModelHook;
use crate::{Error, Result};

/// What the attention layers of a model look like, for checking prefixes.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Number of attention layers.
    pub layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
}

/// The input of the first block after the hook ran.
#[derive(Debug, Clone)]
pub struct Prompted {
    /// Embeddings `[batch, virtual + seq, hidden]`.
    pub embeddings: Tensor,
    /// Attention mask `[batch, prefix + virtual + seq]` (u32, 1 = attend): the prefix, the
    /// virtual tokens and the input, in that order.
    pub mask: Tensor,
    /// Virtual tokens prepended to the input (dropped from the output).
    pub virtual_tokens: usize,
    /// Per-layer keys and values `[batch, kv_heads, prefix, head_dim]`, empty without a prefix.
    pub prefixes: Vec<(Tensor, Tensor)>,
}

impl Prompted {
    /// Positions of the prefix (the offset of the first virtual or input token).
    pub fn prefix_len(&self) -> usize {
        self.prefixes
            .first()
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// Layer `layer`'s keys and values with its prefix in front (unchanged without one).
    pub fn prepend(&self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        match self.prefixes.get(layer) {
            None => Ok((k, v)),
            Some((pk, pv)) => Ok((
                Tensor::cat(&[pk, &k], 2)?.contiguous()?,
                Tensor::cat(&[pv, &v], 2)?.contiguous()?,
            )),
        }
    }

    /// The hidden states of the input tokens: `hidden` `[batch, virtual + seq, ...]` without the
    /// virtual tokens.
    pub fn strip_virtual(&self, hidden: Tensor) -> Result<Tensor> {
        if self.virtual_tokens == 0 {
            return Ok(hidden);
        }
        let total = hidden.dim(1)?;
        Ok(hidden.narrow(1, self.virtual_tokens, total - self.virtual_tokens)?)
    }
}

/// Runs `hook` on `embeddings` `[batch, seq, hidden]` and `mask` `[batch, seq]` (any integer or
/// float dtype, 1 = real token) and collects the prefixes of every layer of `shape`.
pub fn apply(
    hook: &dyn ModelHook,
    embeddings: Tensor,
    mask: &Tensor,
    shape: AttentionShape,
) -> Result<Prompted> {
    let (batch, seq, hidden) = embeddings.dims3()?;
    let float_mask = mask.to_dtype(DType::F32)?;
    let (embeddings, float_mask, virtual_tokens) =
        match hook.embeddings(&embeddings, &float_mask)? {
            None => (embeddings, float_mask, 0),
            Some((e, m)) => {
                let (b, total, h) = e.dims3()?;
                if b != batch || h != hidden || total < seq || m.dims() != [batch, total] {
                    return Err(Error::config(format!(
                        "the method's embeddings hook returned embeddings {:?} and mask {:?} for \
                         an input of {:?}; expected [{batch}, virtual + {seq}, {hidden}] and \
                         [{batch}, virtual + {seq}]",
                        e.dims(),
                        m.dims(),
                        [batch, seq, hidden]
                    )));
                }
                (e, m, total - seq)
            }
        };
    let mut prefixes = Vec::new();
    for layer in 0..shape.layers {
        let Some((k, v)) = hook.attention_prefix(layer, batch)? else {
            if layer == 0 {
                break;
            }
            return Err(Error::config(format!(
                "the method gave attention prefixes to layers 0..{layer} but none to layer \
                 {layer}; a prefix must cover every layer"
            )));
        };
        let len = k.dim(2).unwrap_or(0);
        let want = [batch, shape.kv_heads, len, shape.head_dim];
        if k.dims() != want || v.dims() != want {
            return Err(Error::config(format!(
                "the method's attention prefix of layer {layer} has keys {:?} and values {:?}; \
                 expected {want:?} (batch, key/value heads, prefix, head dim)",
                k.dims(),
                v.dims()
            )));
        }
        if let Some((first, _)) = prefixes.first() {
            let first_len = Tensor::dim(first, 2)?;
            if first_len != len {
                return Err(Error::config(format!(
                    "the method's attention prefix is {first_len} long on layer 0 but {len} on \
                     layer {layer}; every layer needs the same prefix length"
                )));
            }
        }
        prefixes.push((
            k.to_dtype(embeddings.dtype())?,
            v.to_dtype(embeddings.dtype())?,
        ));
    }
    let prefix_len = prefixes.first().map(|(k, _)| k.dim(2)).transpose()?;
    let mut mask = float_mask.ge(0.5)?.to_dtype(DType::U32)?;
    if let Some(p) = prefix_len.filter(|p| *p > 0) {
        let ones = Tensor::ones((batch, p), DType::U32, mask.device())?;
        mask = Tensor::cat(&[&ones, &mask], 1)?;
    }
    Ok(Prompted {
        embeddings,
        mask,
        virtual_tokens,
        prefixes,
    })
}
