//! The checks of the conformance suite, each on a [`Subject`] (a tiny model with the method
//! attached and its parameters perturbed) and each answering an [`Outcome`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::{Device, Tensor};

use super::fixture::{self, Inputs, Subject, INIT_SEED, TRAIN_SEED};
use super::Outcome;
use crate::model::{Mode, Model};
use crate::plugin::Plugin;
use crate::{Error, Result};

/// Largest `|merged - unmerged|` logit difference accepted.
pub const MERGE_TOLERANCE: f64 = 1e-4;
/// Largest logit difference accepted after a save → load round trip.
pub const ROUND_TRIP_TOLERANCE: f64 = 1e-6;
/// Largest native/wasm difference accepted (DESIGN.md: bit-identical).
pub const TRANSPORT_TOLERANCE: f64 = 0.0;
/// Largest |Δ logit| allowed between incremental (KV-cached) decoding and a full forward.
pub const CACHE_TOLERANCE: f64 = 1e-4;
/// Tokens the cached decode starts with (the rest follow one at a time).
const CACHE_PREFILL: usize = 3;
/// Training steps compared between the transports.
pub const TRAIN_STEPS: usize = 5;
/// Learning rate of those steps (plain SGD).
const LR: f64 = 0.1;
/// Forwards run while watching the plugin's live handles.
const HANDLE_FORWARDS: usize = 3;

fn list(names: &[String], max: usize) -> String {
    let mut shown: Vec<&str> = names.iter().take(max).map(String::as_str).collect();
    if names.len() > max {
        shown.push("...");
    }
    shown.join(", ")
}

/// (a) The method wraps at least one module, only linears of the model, and exactly the ones
/// carrying its hooks.
pub fn inject(s: &Subject) -> Result<Outcome> {
    let wrapped = s.adapter.wrapped_modules();
    let linears = s.model.linears();
    let names: BTreeSet<&str> = linears.iter().map(|l| l.name.as_str()).collect();
    let unknown: Vec<String> = wrapped
        .iter()
        .filter(|w| !names.contains(w.as_str()))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Ok(Outcome::fail(
            unknown.len() as f64,
            format!(
                "wraps modules that are not linears of the model: {}",
                list(&unknown, 4)
            ),
        ));
    }
    let hooked: BTreeSet<&str> = linears
        .iter()
        .filter(|l| l.has_hook())
        .map(|l| l.name.as_str())
        .collect();
    let selected: BTreeSet<&str> = wrapped.iter().map(String::as_str).collect();
    if hooked != selected {
        let odd: Vec<String> = hooked
            .symmetric_difference(&selected)
            .map(|s| s.to_string())
            .collect();
        return Ok(Outcome::fail(
            odd.len() as f64,
            format!("hooks and selected modules differ on: {}", list(&odd, 4)),
        ));
    }
    if wrapped.is_empty() {
        return Ok(Outcome::skip(format!(
            "wraps no linear module (it trains {} own and {} base parameters)",
            s.adapter.params().len(),
            s.adapter.base_params().len()
        )));
    }
    Ok(Outcome::pass(
        wrapped.len() as f64,
        format!(
            "wraps {} of {} linears: {}",
            wrapped.len(),
            linears.len(),
            list(wrapped, 3)
        ),
    ))
}

/// (b) An evaluation forward gives finite logits of the right shape.
pub fn forward(s: &Subject, inputs: &Inputs) -> Result<Outcome> {
    let logits = s.logits(inputs, Mode::Eval)?;
    let want = inputs.logits_shape();
    if logits.dims() != want.as_slice() {
        return Ok(Outcome::fail(
            f64::NAN,
            format!("logits have shape {:?}, expected {want:?}", logits.dims()),
        ));
    }
    let values = fixture::values(&logits)?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    let max = values.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    if bad > 0 {
        return Ok(Outcome::fail(
            bad as f64,
            format!("{bad} of {} logits are not finite", values.len()),
        ));
    }
    Ok(Outcome::pass(
        max,
        format!("logits {want:?} finite, max |logit| {max:.4}"),
    ))
}

/// (g) The plugin's live tensor handles do not grow over repeated forwards.
pub fn handles(s: &Subject, inputs: &Inputs) -> Result<Outcome> {
    let transport = &s.adapter.plugin.transport;
    s.logits(inputs, Mode::Eval)?;
    let before = transport.live_handles();
    for _ in 0..HANDLE_FORWARDS {
        s.logits(inputs, Mode::Eval)?;
    }
    let after = transport.live_handles();
    let growth = after as f64 - before as f64;
    let message = format!("live handles {before} → {after} over {HANDLE_FORWARDS} forwards");
    Ok(if after > before {
        Outcome::fail(
            growth,
            format!("{message}: the plugin leaks tensor handles"),
        )
    } else {
        Outcome::pass(growth, message)
    })
}

/// (h) Generation with a KV cache computes what a full forward does: the first row's logits
/// from a prefill of a few tokens followed by one token at a time equal those of one forward
/// over the whole row (virtual tokens and attention prefixes stay in the cache).
pub fn kv_cache(s: &Subject, inputs: &Inputs) -> Result<Outcome> {
    let ids = inputs.ids.narrow(0, 0, 1)?.contiguous()?;
    let seq = ids.dim(1)?;
    let mask = Tensor::ones((1, seq), candle_core::DType::U32, ids.device())?;
    let full = s.model.forward(&ids, &mask, Mode::Eval)?;
    let lm = s
        .model
        .as_causal_lm()
        .ok_or_else(|| Error::config("the fixture model does not generate"))?;
    let mut cache = lm.new_cache();
    let mut parts = vec![lm.forward_cached(&ids.narrow(1, 0, CACHE_PREFILL)?, &mut cache)?];
    for t in CACHE_PREFILL..seq {
        parts.push(lm.forward_cached(&ids.narrow(1, t, 1)?, &mut cache)?);
    }
    let cached = Tensor::cat(&parts, 1)?;
    let diff = fixture::max_abs_diff(&fixture::values(&full)?, &fixture::values(&cached)?);
    let message = format!(
        "prefill of {CACHE_PREFILL} + {} single tokens vs one forward: max |Δ logit| {diff:.2e} \
         (cache holds {} positions for {seq} tokens)",
        seq - CACHE_PREFILL,
        cache.seq_len()
    );
    Ok(if diff <= CACHE_TOLERANCE {
        Outcome::pass(diff, message)
    } else {
        Outcome::fail(diff, message)
    })
}

/// (c) A backward pass gives every trainable parameter of the method a finite, non-zero gradient.
pub fn gradients(s: &Subject, inputs: &Inputs) -> Result<Outcome> {
    let loss = s.loss(inputs, TRAIN_SEED)?;
    let grads = loss.backward()?;
    let trainable = s.adapter.trainable();
    if trainable.is_empty() {
        return Ok(Outcome::fail(0.0, "the method trains no parameter"));
    }
    let mut problems = Vec::new();
    let mut min = f64::INFINITY;
    for p in &trainable {
        let Some(var) = p.var() else {
            problems.push(format!("`{}` is not trainable", p.name()));
            continue;
        };
        match grads.get(var.as_tensor()) {
            None => problems.push(format!("`{}` gets no gradient", p.name())),
            Some(g) => {
                let n = fixture::norm(g)?;
                min = min.min(n);
                if !n.is_finite() || n == 0.0 {
                    problems.push(format!("`{}` has gradient norm {n}", p.name()));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Ok(Outcome::fail(
            problems.len() as f64,
            format!(
                "{} of {} parameters: {}",
                problems.len(),
                trainable.len(),
                list(&problems, 3)
            ),
        ));
    }
    Ok(Outcome::pass(
        min,
        format!(
            "all {} trainable parameters get a gradient (smallest norm {min:.3e})",
            trainable.len()
        ),
    ))
}

/// (c) No frozen base tensor is a variable or gets a gradient.
pub fn frozen(s: &Subject, inputs: &Inputs) -> Result<Outcome> {
    let loss = s.loss(inputs, TRAIN_SEED)?;
    let grads = loss.backward()?;
    let base = s.adapter.base_params();
    let trained: BTreeSet<&str> = base.iter().map(|p| p.name()).collect();
    let mut problems = Vec::new();
    let mut checked = 0usize;
    for p in s.model.params().iter() {
        if trained.contains(p.name()) {
            continue;
        }
        checked += 1;
        if p.var().is_some() {
            problems.push(format!("`{}` is a variable", p.name()));
        } else if grads.get(&p.tensor()).is_some() {
            problems.push(format!("`{}` got a gradient", p.name()));
        }
    }
    if !problems.is_empty() {
        return Ok(Outcome::fail(
            problems.len() as f64,
            format!("{} frozen tensors: {}", problems.len(), list(&problems, 3)),
        ));
    }
    Ok(Outcome::pass(
        checked as f64,
        format!("none of the {checked} frozen base tensors is a variable or gets a gradient"),
    ))
}

/// (d) Folding `ΔW` into the base weights of a second, identical model gives the hooked logits.
pub fn merge(s: &Subject, inputs: &Inputs) -> Result<Outcome> {
    let wrapped = s.adapter.wrapped_modules();
    let mut deltas = Vec::new();
    let mut missing = Vec::new();
    for module in wrapped {
        match s.adapter.delta_weight(module)? {
            Some(dw) => deltas.push((module.clone(), dw)),
            None => missing.push(module.clone()),
        }
    }
    if deltas.is_empty() {
        return Ok(Outcome::skip(if wrapped.is_empty() {
            "wraps no module".to_string()
        } else {
            "delta_weight gives nothing: the method is not mergeable".to_string()
        }));
    }
    if !missing.is_empty() {
        return Ok(Outcome::fail(
            missing.len() as f64,
            format!(
                "delta_weight is given for some modules but not for {}",
                list(&missing, 3)
            ),
        ));
    }
    let merged = fixture::model()?;
    let linears = merged.linears();
    for (module, dw) in &deltas {
        let linear = linears
            .iter()
            .find(|l| l.name == *module)
            .ok_or_else(|| Error::config(format!("`{module}` is not a linear of the model")))?;
        let w = linear.weight().tensor();
        if dw.dims() != w.dims() {
            return Ok(Outcome::fail(
                f64::NAN,
                format!(
                    "ΔW of `{module}` has shape {:?}, the weight {:?}",
                    dw.dims(),
                    w.dims()
                ),
            ));
        }
        let folded = (w + dw.detach().to_dtype(linear.weight().tensor().dtype())?)?;
        linear.weight().set_value(&folded.detach())?;
    }
    for p in s.adapter.base_params() {
        merged
            .params()
            .get(p.name())?
            .set_value(&p.tensor().detach())?;
    }
    let hooked = fixture::values(&s.logits(inputs, Mode::Eval)?)?;
    let plain = fixture::values(&merged.forward(&inputs.ids, &inputs.mask, Mode::Eval)?)?;
    let diff = fixture::max_abs_diff(&hooked, &plain);
    let message = format!(
        "max |merged - unmerged| = {diff:.3e} over {} modules (tolerance {MERGE_TOLERANCE:.0e})",
        deltas.len()
    );
    Ok(if diff <= MERGE_TOLERANCE {
        Outcome::pass(diff, message)
    } else {
        Outcome::fail(diff, message)
    })
}

/// The method's saved state: its own parameters and the base parameters it trains.
fn saved(s: &Subject) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let own = s
        .adapter
        .params()
        .iter()
        .map(|p| (p.name().to_string(), p.tensor().detach()))
        .collect();
    let base = s
        .adapter
        .base_params()
        .iter()
        .map(|p| (p.name().to_string(), p.tensor().detach()))
        .collect();
    (own, base)
}

/// Serializes tensors to safetensors bytes and reads them back.
fn through_safetensors(tensors: &BTreeMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let bytes = safetensors::tensor::serialize(tensors.iter(), None)
        .map_err(|e| Error::config(format!("cannot serialize the adapter: {e}")))?;
    Ok(candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?)
}

/// (e) The parameters saved (through safetensors) and loaded into a fresh instance of the
/// plugin, initialised from another seed, on a fresh model, give the same logits.
pub fn save_load(
    s: &Subject,
    plugin: &Plugin,
    config: &serde_json::Value,
    inputs: &Inputs,
) -> Result<Outcome> {
    let (own, base) = saved(s);
    let own_back = through_safetensors(&own)?;
    let base_back = through_safetensors(&base)?;
    let fresh = fixture::attach(plugin, config, INIT_SEED + 1)?;
    let fresh_names: BTreeSet<String> = fresh
        .adapter
        .params()
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    let saved_names: BTreeSet<String> = own.keys().cloned().collect();
    if fresh_names != saved_names {
        let odd: Vec<String> = fresh_names
            .symmetric_difference(&saved_names)
            .cloned()
            .collect();
        return Ok(Outcome::fail(
            odd.len() as f64,
            format!(
                "a fresh instance creates different parameters: {}",
                list(&odd, 3)
            ),
        ));
    }
    for p in fresh.adapter.params() {
        let value = own_back
            .get(p.name())
            .ok_or_else(|| Error::UnknownParam(p.name().to_string()))?;
        p.set_value(value)?;
    }
    for (name, value) in &base_back {
        fresh.model.params().get(name)?.set_value(value)?;
    }
    let before = fixture::values(&s.logits(inputs, Mode::Eval)?)?;
    let after = fixture::values(&fresh.logits(inputs, Mode::Eval)?)?;
    let diff = fixture::max_abs_diff(&before, &after);
    let message = format!(
        "{} own and {} base tensors; max |logit difference| = {diff:.3e}",
        own.len(),
        base.len()
    );
    Ok(if diff <= ROUND_TRIP_TOLERANCE {
        Outcome::pass(diff, message)
    } else {
        Outcome::fail(diff, message)
    })
}

/// What one transport computes in the cross-transport check.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Evaluation logits before training.
    pub logits: Vec<f32>,
    /// The loss of each SGD step.
    pub losses: Vec<f32>,
}

/// Attaches `plugin`, perturbs it, records its logits and runs [`TRAIN_STEPS`] steps of plain
/// SGD on everything the method trains.
pub fn trace(plugin: &Plugin, config: &serde_json::Value, inputs: &Inputs) -> Result<Trace> {
    let s = fixture::attach(plugin, config, INIT_SEED)?;
    s.perturb()?;
    let logits = fixture::values(&s.logits(inputs, Mode::Eval)?)?;
    let vars: Vec<_> = s
        .adapter
        .trainable()
        .iter()
        .filter_map(|p| p.var())
        .collect();
    let mut losses = Vec::with_capacity(TRAIN_STEPS);
    for step in 0..TRAIN_STEPS {
        s.model.forward_context().set_step(step as u64);
        let loss = s.loss(inputs, TRAIN_SEED + step as u64)?;
        losses.push(fixture::scalar(&loss)?);
        let grads = loss.backward()?;
        for var in &vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let next = (var.as_tensor() - (g * LR)?)?;
                var.set(&next.detach())?;
            }
        }
    }
    Ok(Trace { logits, losses })
}

/// (f) Native and wasm builds give the same logits and the same training losses.
pub fn compare(native: &Trace, wasm: &Trace) -> Outcome {
    let logits = fixture::max_abs_diff(&native.logits, &wasm.logits);
    let losses = fixture::max_abs_diff(&native.losses, &wasm.losses);
    let diff = logits.max(losses);
    let fmt = |v: &[f32]| {
        v.iter()
            .map(|l| format!("{l:.6}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let message = format!(
        "max |Δlogit| {logits:.3e}, max |Δloss| {losses:.3e} over {TRAIN_STEPS} SGD steps \
         (native losses {}; wasm {})",
        fmt(&native.losses),
        fmt(&wasm.losses)
    );
    if diff <= TRANSPORT_TOLERANCE {
        Outcome::pass(diff, message)
    } else {
        Outcome::fail(diff, message)
    }
}
