//! Evaluation, generation and embedding with the active adapter.

use std::ffi::c_char;

use whetstone_host::model::generate::GenerateOptions;

use crate::session::{with_session, WhetSession};
use crate::status::{guard, require_out, text, ApiError, WhetError, WhetStatus};
use crate::text::WhetText;

/// Figures of an evaluation on the session's validation examples. Figures that do not apply
/// are NaN.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WhetEvalReport {
    /// Mean loss (per example for classification, per predicted token for language models).
    pub loss: f64,
    /// Share of examples classified right (classification).
    pub accuracy: f64,
    /// `exp(loss)` (language models).
    pub perplexity: f64,
    /// Number of examples evaluated.
    pub examples: u64,
}

/// How to generate (`whet_generate_options_default` gives the defaults).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WhetGenerateOptions {
    /// Most tokens to generate.
    pub max_new_tokens: u32,
    /// Sampling temperature; 0 decodes greedily.
    pub temperature: f64,
    /// Nucleus sampling mass (1 keeps every token).
    pub top_p: f64,
    /// Seed of the sampler: same seed, same text.
    pub seed: u64,
    /// Non-zero: the prompt is a user turn of the model's chat template.
    pub chat: i32,
}

/// Greedy decoding of up to 64 tokens, seed 0, no chat template.
#[no_mangle]
pub extern "C" fn whet_generate_options_default() -> WhetGenerateOptions {
    let d = GenerateOptions::default();
    WhetGenerateOptions {
        max_new_tokens: d.max_new_tokens as u32,
        temperature: d.temperature,
        top_p: d.top_p,
        seed: d.seed,
        chat: i32::from(d.chat),
    }
}

/// Evaluates the active adapter on the validation examples of the session's data.
///
/// # Safety
/// `out_report` and `err` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_evaluate(
    session: WhetSession,
    out_report: *mut WhetEvalReport,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            require_out(out_report, "out_report")?;
            with_session(session, |s, _| {
                let m = s.evaluate()?;
                out_report.write(WhetEvalReport {
                    loss: m.loss,
                    accuracy: m.accuracy.unwrap_or(f64::NAN),
                    perplexity: m.perplexity.unwrap_or(f64::NAN),
                    examples: m.examples as u64,
                });
                Ok(WhetStatus::Ok)
            })
        })
    }
}

/// Generates a continuation of `prompt` (a causal language model) with the active adapter and
/// stores the generated text (without the prompt) as a text handle in `*out_text`; free it
/// with `whet_text_free`. `options` may be NULL for the defaults.
///
/// # Safety
/// `prompt` is NULL or NUL-terminated; `options` is NULL or readable; `out_text` and `err` are
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_generate(
    session: WhetSession,
    prompt: *const c_char,
    options: *const WhetGenerateOptions,
    out_text: *mut WhetText,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            let prompt = text(prompt, "prompt")?;
            require_out(out_text, "out_text")?;
            let o = if options.is_null() {
                whet_generate_options_default()
            } else {
                options.read()
            };
            let valid = o.temperature >= 0.0 && o.top_p > 0.0 && o.top_p <= 1.0;
            if !valid {
                return Err(ApiError::invalid(format!(
                    "temperature must be ≥ 0 and top_p in (0, 1] (got {} and {})",
                    o.temperature, o.top_p
                )));
            }
            let opts = GenerateOptions {
                max_new_tokens: o.max_new_tokens as usize,
                temperature: o.temperature,
                top_p: o.top_p,
                seed: o.seed,
                chat: o.chat != 0,
                system: None,
            };
            with_session(session, |s, _| {
                let generation = s.generate(prompt, &opts)?;
                let handle = crate::text::store(&generation.text)
                    .ok_or_else(|| ApiError::new(WhetStatus::Failed, "too many live texts"))?;
                out_text.write(handle);
                Ok(WhetStatus::Ok)
            })
        })
    }
}

/// Stores the width of the session's sentence embeddings in `*out_dim` (encoder models).
///
/// # Safety
/// `out_dim` and `err` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_embedding_dim(
    session: WhetSession,
    out_dim: *mut usize,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            require_out(out_dim, "out_dim")?;
            with_session(session, |s, _| {
                out_dim.write(s.embedding_dim()?);
                Ok(WhetStatus::Ok)
            })
        })
    }
}

/// Embeds `count` texts with the active adapter (the model's pooling, evaluation mode) into
/// `out`, row after row: `out_len` must be at least `count × whet_session_embedding_dim`.
/// Non-zero `normalize` scales each row to unit length (as sentence-transformers does).
///
/// # Safety
/// `texts` is NULL or points to `count` NUL-terminated strings; `out` is NULL or writable for
/// `out_len` floats; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_embed(
    session: WhetSession,
    texts: *const *const c_char,
    count: usize,
    normalize: i32,
    out: *mut f32,
    out_len: usize,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            if count == 0 {
                return Err(ApiError::invalid("count is 0: nothing to embed"));
            }
            if texts.is_null() {
                return Err(ApiError::invalid("texts is NULL"));
            }
            require_out(out, "out")?;
            let strings = (0..count)
                .map(|i| text(*texts.add(i), &format!("texts[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            with_session(session, |s, _| {
                let dim = s.embedding_dim()?;
                let needed = count.saturating_mul(dim);
                if out_len < needed {
                    return Err(ApiError::new(
                        WhetStatus::BufferTooSmall,
                        format!(
                            "out holds {out_len} floats, {count} embeddings of {dim} need {needed}"
                        ),
                    ));
                }
                let embeddings = s.embed(&strings, normalize != 0)?;
                std::ptr::copy_nonoverlapping(
                    embeddings.values.as_ptr(),
                    out,
                    embeddings.values.len().min(out_len),
                );
                Ok(WhetStatus::Ok)
            })
        })
    }
}
