//! The conformance suite every PEFT method plugin passes (DESIGN.md, "Conventions"), run by
//! `whet plugin check` and by the tests of first-party plugins. Loss plugins have their own
//! checks (`value`, `gradients`, `native-wasm`: see `loss_checks`).
//!
//! For a method, on a tiny random Llama with fixed seeds, for each build of the plugin (native, wasm):
//!
//! - **inject**: the method wraps at least one module, only linears of the model, and exactly
//!   the modules carrying its hooks;
//! - **forward**: finite logits of the right shape;
//! - **handles**: the plugin's live tensor handles do not grow over repeated forwards;
//! - **kv-cache**: decoding with a KV cache (a short prefill, then one token at a time) gives the
//!   logits of one full forward, virtual tokens and attention prefixes included;
//! - **gradients**: every parameter the method trains gets a finite, non-zero gradient (after a
//!   small seeded perturbation, so that zero-initialised factors do not block it);
//! - **frozen**: no frozen base tensor is a variable or gets a gradient;
//! - **merge**: when the method gives `ΔW`, folding it into the weights of an identical model
//!   gives the hooked logits (within [`checks::MERGE_TOLERANCE`]);
//! - **save-load**: its parameters, saved through safetensors and loaded into a fresh instance
//!   initialised from another seed, give the same logits;
//!
//! and, when both builds are checked, **native-wasm**: the same logits and the same losses over
//! [`checks::TRAIN_STEPS`] SGD steps (bit-identical, DESIGN.md principle 2).
//!
//! A data loader is checked on sample files ([`check_with_data`]): `create`, `read` and
//! `native-wasm` (see `loader_checks`).
//!
//! An error inside a check is a failed check, never an early return: the report shows all.

mod checks;
mod fixture;
mod loader_checks;
mod loss_checks;

use std::fmt;
use std::time::Instant;

use serde::Serialize;

pub use checks::{
    CACHE_TOLERANCE, MERGE_TOLERANCE, ROUND_TRIP_TOLERANCE, TRAIN_STEPS, TRANSPORT_TOLERANCE,
};
pub use fixture::tiny_config;

use super::{Manifest, Plugin, TransportKind};
use crate::Result;

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The plugin conforms.
    Pass,
    /// It does not (or the check could not run).
    Fail,
    /// The check does not apply (e.g. a method without `ΔW` is not merged).
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        })
    }
}

/// What a check found, before it is named and timed.
#[derive(Debug, Clone)]
struct Outcome {
    status: Status,
    figure: Option<f64>,
    message: String,
}

impl Outcome {
    fn pass(figure: f64, message: impl Into<String>) -> Outcome {
        Outcome {
            status: Status::Pass,
            figure: Some(figure),
            message: message.into(),
        }
    }

    fn fail(figure: f64, message: impl Into<String>) -> Outcome {
        Outcome {
            status: Status::Fail,
            figure: Some(figure).filter(|f| !f.is_nan()),
            message: message.into(),
        }
    }

    fn skip(message: impl Into<String>) -> Outcome {
        Outcome {
            status: Status::Skip,
            figure: None,
            message: message.into(),
        }
    }
}

/// One check of one build.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// The check (`inject`, `forward`, `handles`, `gradients`, `frozen`, `merge`, `save-load`,
    /// `native-wasm`, or `load` / `attach` when the plugin could not be set up).
    pub name: String,
    /// The build checked (`None` for a check across builds).
    pub transport: Option<TransportKind>,
    /// Pass, fail or skip.
    pub status: Status,
    /// The check's headline number (a count, a norm, a maximum difference).
    pub figure: Option<f64>,
    /// What was found.
    pub message: String,
    /// Wall-clock seconds the check took.
    pub seconds: f64,
}

/// The result of [`check`].
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The plugin's id.
    pub plugin: String,
    /// Its version.
    pub version: String,
    /// The configuration the method was checked with.
    pub config: serde_json::Value,
    /// The builds checked.
    pub transports: Vec<TransportKind>,
    /// Every check, in order.
    pub checks: Vec<CheckResult>,
    /// Wall-clock seconds of the whole suite.
    pub seconds: f64,
}

impl Report {
    /// Whether no check failed (skipped checks do not count against the plugin).
    pub fn passed(&self) -> bool {
        self.failures().next().is_none()
    }

    /// The failed checks.
    pub fn failures(&self) -> impl Iterator<Item = &CheckResult> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }

    /// How many checks ended with `status`.
    pub fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }
}

fn transport_name(t: Option<TransportKind>) -> &'static str {
    match t {
        None => "both",
        Some(TransportKind::Native) => "native",
        Some(TransportKind::Wasm) => "wasm",
        Some(TransportKind::Auto) => "auto",
    }
}

/// A figure as text: counts as integers, measurements in scientific notation.
fn figure(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else {
        format!("{v:.3e}")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "conformance of `{}` {} with {}",
            self.plugin, self.version, self.config
        )?;
        for c in &self.checks {
            let figure = c.figure.map(figure).unwrap_or_default();
            writeln!(
                f,
                "  {} {:<6} {:<10} {:>10} {:>7.0} ms  {}",
                c.status,
                transport_name(c.transport),
                c.name,
                figure,
                c.seconds * 1000.0,
                c.message
            )?;
        }
        write!(
            f,
            "{} passed, {} failed, {} skipped in {:.2} s",
            self.count(Status::Pass),
            self.count(Status::Fail),
            self.count(Status::Skip),
            self.seconds
        )
    }
}

/// Runs `f` as check `name`, timing it and turning an error into a failed check.
fn run(
    checks: &mut Vec<CheckResult>,
    name: &str,
    transport: Option<TransportKind>,
    f: impl FnOnce() -> Result<Outcome>,
) -> Status {
    let start = Instant::now();
    let outcome = f().unwrap_or_else(|e| Outcome {
        status: Status::Fail,
        figure: None,
        message: e.to_string(),
    });
    let status = outcome.status;
    checks.push(CheckResult {
        name: name.to_string(),
        transport,
        status,
        figure: outcome.figure,
        message: outcome.message,
        seconds: start.elapsed().as_secs_f64(),
    });
    status
}

/// The builds to check: those asked for (an empty list or `Auto` means every build the
/// manifest names), without repeats.
fn builds(manifest: &Manifest, asked: &[TransportKind]) -> Vec<TransportKind> {
    let a = &manifest.artifacts;
    let all: Vec<TransportKind> = [
        (TransportKind::Native, a.native.is_some()),
        (TransportKind::Wasm, a.wasm.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, present)| present.then_some(k))
    .collect();
    if asked.is_empty() || asked.contains(&TransportKind::Auto) {
        return all;
    }
    let mut out = Vec::new();
    for k in asked {
        if !out.contains(k) {
            out.push(*k);
        }
    }
    out
}

/// The `load` check of one build: the plugin when it loaded.
fn load_build(
    manifest: &Manifest,
    kind: TransportKind,
    checks: &mut Vec<CheckResult>,
) -> Option<Plugin> {
    let mut plugin = None;
    let loaded = run(checks, "load", Some(kind), || {
        let p = Plugin::load(manifest, kind)?;
        let message = format!(
            "{} {} (sdk {}, contract {})",
            p.metadata.name, p.metadata.version, p.metadata.sdk_version, p.metadata.contract
        );
        plugin = Some(p);
        Ok(Outcome::pass(0.0, message))
    });
    plugin.filter(|_| loaded == Status::Pass)
}

/// Checks one build of a loss plugin; returns what it computed when it could run.
fn check_loss_build(
    manifest: &Manifest,
    kind: TransportKind,
    config: &serde_json::Value,
    inputs: &loss_checks::LossInputs,
    checks: &mut Vec<CheckResult>,
) -> Option<loss_checks::LossTrace> {
    let t = Some(kind);
    let plugin = load_build(manifest, kind, checks)?;
    let mut adapter = None;
    run(checks, "attach", t, || {
        adapter = Some(loss_checks::attach(&plugin, config)?);
        Ok(Outcome::pass(0.0, "loss created from the configuration"))
    });
    let adapter = adapter?;
    let mut trace = None;
    run(checks, "value", t, || {
        let computed = loss_checks::trace(&adapter, inputs)?;
        let outcome = loss_checks::value(&computed);
        trace = Some(computed);
        Ok(outcome)
    });
    let trace = trace?;
    run(checks, "gradients", t, || {
        Ok(loss_checks::gradients(&trace, inputs))
    });
    Some(trace)
}

/// Checks one build of a data loader on the sample files; returns what it read.
fn check_loader_build(
    manifest: &Manifest,
    kind: TransportKind,
    config: &serde_json::Value,
    data: &[std::path::PathBuf],
    checks: &mut Vec<CheckResult>,
) -> Option<loader_checks::LoaderTrace> {
    let t = Some(kind);
    let plugin = load_build(manifest, kind, checks)?;
    let mut trace = None;
    run(checks, "read", t, || {
        if data.is_empty() {
            return Ok(Outcome::fail(
                0.0,
                "a data loader is checked on sample files: pass --data FILE (repeatable)",
            ));
        }
        let read = loader_checks::trace(&plugin, config, data)?;
        let outcome = loader_checks::read(&read);
        trace = Some(read);
        Ok(outcome)
    });
    trace
}

/// Checks one build; returns the loaded plugin when it could be loaded and attached.
fn check_build(
    manifest: &Manifest,
    kind: TransportKind,
    config: &serde_json::Value,
    inputs: &fixture::Inputs,
    checks: &mut Vec<CheckResult>,
) -> Option<Plugin> {
    let t = Some(kind);
    let plugin = load_build(manifest, kind, checks)?;
    let mut subject = None;
    run(checks, "attach", t, || {
        let s = fixture::attach(&plugin, config, fixture::INIT_SEED)?;
        let message = format!(
            "{} own parameters ({} values), {} trained base parameters",
            s.adapter.params().len(),
            s.adapter
                .params()
                .iter()
                .map(|p| p.elem_count())
                .sum::<usize>(),
            s.adapter.base_params().len()
        );
        subject = Some(s);
        Ok(Outcome::pass(0.0, message))
    });
    let s = subject?;
    run(checks, "inject", t, || checks::inject(&s));
    let perturbed = s.perturb();
    run(checks, "forward", t, || checks::forward(&s, inputs));
    run(checks, "handles", t, || checks::handles(&s, inputs));
    run(checks, "kv-cache", t, || checks::kv_cache(&s, inputs));
    run(checks, "gradients", t, || {
        perturbed.map_err(|e| {
            crate::Error::config(format!("cannot perturb the method's parameters: {e}"))
        })?;
        checks::gradients(&s, inputs)
    });
    run(checks, "frozen", t, || checks::frozen(&s, inputs));
    run(checks, "merge", t, || checks::merge(&s, inputs));
    run(checks, "save-load", t, || {
        checks::save_load(&s, &plugin, config, inputs)
    });
    Some(plugin)
}

/// The native and the wasm entry of `done`, when both are there.
fn both<T>(done: &[(TransportKind, T)]) -> Option<(&T, &T)> {
    let find = |kind| done.iter().find(|(k, _)| *k == kind).map(|(_, v)| v);
    Some((find(TransportKind::Native)?, find(TransportKind::Wasm)?))
}

/// Runs the conformance suite on the plugin of `manifest`, configured by `config` (PEFT's JSON
/// fields for a method), for each of `transports` (empty or `Auto`: every build present): the
/// method checks, or the loss checks for a plugin that provides a loss and no method.
///
/// Fails only when the fixture itself cannot be built; everything the plugin does wrong is a
/// failed check in the [`Report`].
pub fn check(
    manifest: &Manifest,
    transports: &[TransportKind],
    config: serde_json::Value,
) -> Result<Report> {
    check_with_data(manifest, transports, config, &[])
}

/// [`check`], with sample files for a data loader (a plugin that provides a data loader and
/// neither a method nor a loss is checked on them; without any, its `read` check fails).
pub fn check_with_data(
    manifest: &Manifest,
    transports: &[TransportKind],
    config: serde_json::Value,
    data: &[std::path::PathBuf],
) -> Result<Report> {
    use whetstone_sdk::PluginKind;
    let start = Instant::now();
    let kinds = builds(manifest, transports);
    let mut checks = Vec::new();
    let is_method = manifest.kinds.contains(&PluginKind::Method);
    let is_loss = manifest.kinds.contains(&PluginKind::Loss) && !is_method;
    let is_loader = manifest.kinds.contains(&PluginKind::DataLoader) && !is_method && !is_loss;
    if is_loader {
        let mut done = Vec::new();
        for &kind in &kinds {
            if let Some(t) = check_loader_build(manifest, kind, &config, data, &mut checks) {
                done.push((kind, t));
            }
        }
        if let Some((n, w)) = both(&done) {
            run(&mut checks, "native-wasm", None, || {
                Ok(loader_checks::compare(n, w))
            });
        }
    } else if is_loss {
        let inputs = loss_checks::LossInputs::new()?;
        let mut done = Vec::new();
        for &kind in &kinds {
            if let Some(t) = check_loss_build(manifest, kind, &config, &inputs, &mut checks) {
                done.push((kind, t));
            }
        }
        if let Some((n, w)) = both(&done) {
            run(&mut checks, "native-wasm", None, || {
                Ok(loss_checks::compare(n, w))
            });
        }
    } else {
        let inputs = fixture::Inputs::new()?;
        let mut loaded = Vec::new();
        for &kind in &kinds {
            if let Some(p) = check_build(manifest, kind, &config, &inputs, &mut checks) {
                loaded.push((kind, p));
            }
        }
        if let Some((n, w)) = both(&loaded) {
            run(&mut checks, "native-wasm", None, || {
                let a = checks::trace(n, &config, &inputs)?;
                let b = checks::trace(w, &config, &inputs)?;
                Ok(checks::compare(&a, &b))
            });
        }
    }
    if kinds.is_empty() {
        run(&mut checks, "load", None, || {
            Ok(Outcome::fail(
                0.0,
                format!(
                    "{} names no build; run `whet plugin build`",
                    manifest.dir.display()
                ),
            ))
        });
    }
    Ok(Report {
        plugin: manifest.id.clone(),
        version: manifest.version.clone(),
        config,
        transports: kinds,
        checks,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::plugin::manifest::{Artifacts, Limits};

    fn manifest(native: bool, wasm: bool) -> Manifest {
        Manifest {
            id: "m".into(),
            version: "0.1.0".into(),
            kinds: vec![whetstone_sdk::PluginKind::Method],
            sdk_version: "0.1.0".into(),
            contract: whetstone_sdk::CONTRACT_VERSION.to_string(),
            description: String::new(),
            artifacts: Artifacts {
                native: native.then(|| PathBuf::from("libm.so")),
                wasm: wasm.then(|| PathBuf::from("m.wasm")),
                ..Artifacts::default()
            },
            limits: Limits::default(),
            dir: PathBuf::from("/nowhere"),
        }
    }

    #[test]
    fn builds_default_to_every_artifact_and_keep_explicit_asks() {
        use TransportKind::*;
        assert_eq!(builds(&manifest(true, true), &[]), vec![Native, Wasm]);
        assert_eq!(builds(&manifest(false, true), &[Auto]), vec![Wasm]);
        assert_eq!(builds(&manifest(true, false), &[Wasm, Wasm]), vec![Wasm]);
    }

    #[test]
    fn a_missing_build_is_a_failed_load_and_skips_do_not_fail() {
        let report = check(&manifest(true, false), &[], serde_json::json!({})).unwrap();
        assert!(!report.passed());
        let failure = report.failures().next().unwrap();
        assert_eq!(
            (failure.name.as_str(), failure.status),
            ("load", Status::Fail)
        );
        assert!(
            report.to_string().contains("0 passed, 1 failed"),
            "{report}"
        );

        let mut skipped = report.clone();
        skipped.checks[0].status = Status::Skip;
        assert!(skipped.passed());
        assert_eq!(
            (figure(4.0), figure(5.96e-8)),
            ("4".into(), "5.960e-8".into())
        );
    }
}
