//! The two plugin transports end to end: the fixture plugin `tests/fixtures/plugins/echo` is
//! built natively and for wasm32 with `plugin::build`, and both builds must give bit-identical
//! outputs, parameters and gradients, leak no handles, and report failures as plugin errors
//! naming the call. The wasm build must also trap cleanly on a panic, stop at its deadline and
//! at its memory cap, and refuse to be called after a trap.
//!
//! Without a wasm32 toolchain the tests print why and pass, unless `WHETSTONE_REQUIRE_WASM` is
//! set (CI sets it).

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use whetstone_host::model::hooks::ForwardContext;
use whetstone_host::params::ParamStore;
use whetstone_host::plugin::build::{self, BuildOptions};
use whetstone_host::plugin::manifest::Limits;
use whetstone_host::plugin::session::Session;
use whetstone_host::plugin::wasm::WasmPlugin;
use whetstone_host::plugin::{Manifest, Plugin, Transport, TransportKind};
use whetstone_host::Error;
use whetstone_sdk::{LinearInfo, ModelInfo, PluginKind};

const Q: &str = "model.layers.0.self_attn.q_proj";
const K: &str = "model.layers.0.self_attn.k_proj";
const IN: usize = 6;
const OUT: usize = 8;

/// The fixture built both ways into a temporary plugin directory, once per test binary; `None`
/// (after saying why) when this machine cannot build wasm32.
fn built() -> Option<&'static Manifest> {
    static BUILT: OnceLock<Option<(tempfile::TempDir, Manifest)>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if !build::wasm_toolchain_available() {
                let why = build::missing_wasm_toolchain();
                assert!(
                    std::env::var_os("WHETSTONE_REQUIRE_WASM").is_none(),
                    "{why}"
                );
                eprintln!("skipping the plugin transport tests: {why}");
                return None;
            }
            let crate_dir =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plugins/echo");
            let out = tempfile::tempdir().unwrap();
            let opts = BuildOptions {
                native: true,
                wasm: true,
                out_dir: Some(out.path().to_path_buf()),
                release: false,
            };
            let start = Instant::now();
            let manifest = build::build(&crate_dir, &opts).unwrap();
            eprintln!("built the echo plugin both ways in {:.1?}", start.elapsed());
            Some((out, manifest))
        })
        .as_ref()
        .map(|(_, m)| m)
}

fn values(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * scale)
        .collect()
}

fn base_weight() -> Tensor {
    Tensor::from_vec(values(OUT * IN, 0.1), (OUT, IN), &Device::Cpu).unwrap()
}

/// A session over a one-parameter "model" with a seeded generator, in training mode (while
/// evaluating, the host hands plugins detached parameters and nothing is differentiated).
fn session() -> Arc<Session> {
    let mut base = ParamStore::new();
    base.insert(format!("{Q}.weight"), base_weight());
    let ctx = Arc::new(ForwardContext::default());
    ctx.set_mode(whetstone_host::model::Mode::Train);
    ctx.reseed(42);
    Arc::new(Session::new(Device::Cpu, base, ctx))
}

fn linear(name: &str) -> LinearInfo {
    LinearInfo {
        name: name.into(),
        in_features: IN,
        out_features: OUT,
        has_bias: false,
        layer_index: Some(0),
    }
}

fn model_info() -> ModelInfo {
    ModelInfo {
        architecture: "LlamaForCausalLM".into(),
        task: "causal-lm".into(),
        hidden_size: IN,
        num_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 2,
        head_dim: 3,
        vocab_size: 16,
    }
}

/// `x` `[2, 3, in]` and the frozen base output `x·Wᵀ`.
fn inputs() -> (Tensor, Tensor) {
    let x = Tensor::from_vec(values(2 * 3 * IN, 0.25), (2, 3, IN), &Device::Cpu).unwrap();
    let base = x.broadcast_matmul(&base_weight().t().unwrap()).unwrap();
    (x, base)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// A method instance of `t` attached to a fresh session, with `q_proj` initialised.
fn attach(t: &dyn Transport, config: &str) -> (Arc<Session>, u32) {
    let s = session();
    t.set_session(Some(s.clone()));
    let id = t.create_method(config).unwrap();
    t.init_model(id, &model_info()).unwrap();
    t.init_linear(id, &linear(Q)).unwrap();
    (s, id)
}

/// Everything one transport computes for the fixture: output, ΔW, parameters and gradients,
/// as bit patterns.
#[derive(Debug, PartialEq)]
struct Outcome {
    output: Vec<u32>,
    delta: Vec<u32>,
    params: Vec<(String, Vec<u32>)>,
    grads: Vec<(String, Vec<u32>)>,
}

fn run(plugin: &Plugin) -> Outcome {
    let t = plugin.transport.as_ref();
    let s = session();
    t.set_session(Some(s.clone()));
    let baseline = t.live_handles();
    let id = t.create_method("{}").unwrap();
    t.init_model(id, &model_info()).unwrap();
    assert!(t.select_linear(id, &linear(Q)).unwrap());
    assert!(!t.select_linear(id, &linear(K)).unwrap());
    t.init_linear(id, &linear(Q)).unwrap();
    let (x, base) = inputs();
    let y = t.forward_linear(id, Q, &x, &base).unwrap();
    let delta = t.delta_weight(id, Q).unwrap().expect("echo is mergeable");
    assert_eq!(
        t.live_handles(),
        baseline,
        "{:?} leaked handles",
        plugin.transport_kind
    );

    // The output is the fixture's formula, computed here from the parameters it created.
    let (a, b) = s.with_params(|p| {
        let get = |k: &str| p.get(&format!("{Q}.{k}")).unwrap().tensor();
        (get("lora_A.weight"), get("lora_B.weight"))
    });
    assert_eq!(a.dims(), [2, IN]);
    assert_eq!(b.dims(), [OUT, 2]);
    assert!(bits(&b).iter().all(|&v| v == 0.01f32.to_bits()));
    let expected = (&base
        + x.broadcast_matmul(&a.t().unwrap())
            .unwrap()
            .broadcast_matmul(&b.t().unwrap())
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap())
    .unwrap();
    let gap = (&y - &expected).unwrap().abs().unwrap().max_all().unwrap();
    assert!(gap.to_scalar::<f32>().unwrap() < 1e-6);

    // Gradients flow through the host ops the plugin asked for.
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let (params, grads) = s.with_params(|p| {
        let params = p
            .iter()
            .map(|p| (p.name().to_string(), bits(&p.tensor())))
            .collect();
        let grads = p
            .iter()
            .map(|p| {
                let var = p.var().expect("plugin parameters train");
                (
                    p.name().to_string(),
                    bits(grads.get(var.as_tensor()).expect("a gradient")),
                )
            })
            .collect();
        (params, grads)
    });
    t.set_session(None);
    Outcome {
        output: bits(&y),
        delta: bits(&delta),
        params,
        grads,
    }
}

#[test]
fn native_and_wasm_give_bit_identical_results() {
    let Some(manifest) = built() else { return };
    assert_eq!(manifest.id, "echo");
    assert_eq!(manifest.kinds, vec![PluginKind::Method]);
    assert!(manifest.artifacts.native.is_some() && manifest.artifacts.wasm.is_some());
    let reread = Manifest::read(&manifest.dir).unwrap();
    assert_eq!(reread.artifacts, manifest.artifacts);

    let native = Plugin::load(manifest, TransportKind::Native).unwrap();
    let wasm = Plugin::load(manifest, TransportKind::Wasm).unwrap();
    assert_eq!(native.transport_kind, TransportKind::Native);
    assert_eq!(wasm.transport_kind, TransportKind::Wasm);
    assert_eq!(native.metadata, wasm.metadata);
    assert_eq!(wasm.metadata.name, "whetstone-echo");

    let a = run(&native);
    let b = run(&wasm);
    assert_eq!(a.params.len(), 2);
    assert_eq!(a, b);
}

fn plugin_error(e: Error) -> (String, String, String) {
    match e {
        Error::Plugin {
            plugin,
            call,
            message,
        } => (plugin, call, message),
        other => panic!("expected a plugin error, got {other}"),
    }
}

#[test]
fn plugin_errors_name_the_call_and_keep_the_plugin_usable() {
    let Some(manifest) = built() else { return };
    // Only the wasm build here: the native library is one instance per process, which the
    // comparison test owns.
    let plugin = Plugin::load(manifest, TransportKind::Wasm).unwrap();
    let t = plugin.transport.as_ref();
    let (_s, id) = attach(t, "{}");
    let baseline = t.live_handles();
    let (x, base) = inputs();
    let err = t
        .forward_linear(id, "model.nowhere", &x, &base)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("plugin `echo`: forward-linear: "),
        "{err}"
    );
    let (plugin_id, call, message) = plugin_error(err);
    assert_eq!(
        (plugin_id.as_str(), call.as_str()),
        ("echo", "forward-linear")
    );
    assert!(
        message.contains("`model.nowhere` was not initialised"),
        "{message}"
    );
    assert_eq!(
        t.live_handles(),
        baseline,
        "the refused call's inputs were released"
    );

    let err = t.create_method(r#"{"r": 8}"#).unwrap_err();
    assert!(
        err.to_string().contains("create-method") && err.to_string().contains("`r`"),
        "{err}"
    );
    // Still usable after plugin errors.
    t.forward_linear(id, Q, &x, &base).unwrap();
}

#[test]
fn a_panic_traps_names_the_call_and_fails_the_plugin() {
    let Some(manifest) = built() else { return };
    let plugin = Plugin::load(manifest, TransportKind::Wasm).unwrap();
    let t = plugin.transport.as_ref();
    let (_s, id) = attach(t, r#"{"fail": "panic"}"#);
    let (x, base) = inputs();
    let (_, call, message) = plugin_error(t.forward_linear(id, Q, &x, &base).unwrap_err());
    assert_eq!(call, "forward-linear");
    assert!(message.starts_with("wasm trap: "), "{message}");
    assert!(message.contains("echo was told to panic"), "{message}");
    assert_eq!(
        t.live_handles(),
        0,
        "a trapped plugin's handles are dropped"
    );

    let err = t.delta_weight(id, Q).unwrap_err().to_string();
    assert!(
        err.contains("delta-weight") && err.contains("earlier failure"),
        "{err}"
    );
    assert!(err.contains("forward-linear: wasm trap"), "{err}");
}

fn load_with(manifest: &Manifest, limits: Limits) -> WasmPlugin {
    let wasm = manifest.artifacts.wasm.as_ref().unwrap();
    WasmPlugin::load(&manifest.id, &manifest.artifact(wasm), limits).unwrap()
}

#[test]
fn a_runaway_call_stops_at_its_deadline() {
    let Some(manifest) = built() else { return };
    let limits = Limits {
        call_timeout_ms: 200,
        ..Limits::default()
    };
    let plugin = load_with(manifest, limits);
    let (_s, id) = attach(&plugin, r#"{"fail": "spin"}"#);
    let (x, base) = inputs();
    let start = Instant::now();
    let (_, call, message) = plugin_error(plugin.forward_linear(id, Q, &x, &base).unwrap_err());
    let took = start.elapsed();
    eprintln!("the spinning call stopped after {took:?}");
    assert_eq!(call, "forward-linear");
    assert!(
        message.contains("exceeded its 200 ms deadline"),
        "{message}"
    );
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn a_hoarding_plugin_stops_at_its_memory_cap() {
    let Some(manifest) = built() else { return };
    let limits = Limits {
        memory_mb: 24,
        ..Limits::default()
    };
    let plugin = load_with(manifest, limits);
    let (_s, id) = attach(&plugin, r#"{"fail": "grow"}"#);
    let (x, base) = inputs();
    let start = Instant::now();
    let (_, call, message) = plugin_error(plugin.forward_linear(id, Q, &x, &base).unwrap_err());
    eprintln!("the hoarding call stopped after {:?}", start.elapsed());
    assert_eq!(call, "forward-linear");
    assert!(
        message.contains("exceeded its 24 MiB memory cap"),
        "{message}"
    );
}

#[test]
fn a_core_module_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("core.wasm");
    std::fs::write(&path, b"\0asm\x01\0\0\0").unwrap();
    let err = WasmPlugin::load("core", &path, Limits::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin `core`: load") && err.contains("not a component"),
        "{err}"
    );
}

#[test]
fn forged_and_freed_handles_are_plugin_errors_not_host_panics() {
    let Some(manifest) = built() else { return };
    for (fail, what) in [("forge", "never given out"), ("freed", "already released")] {
        let plugin = Plugin::load(manifest, TransportKind::Wasm).unwrap();
        let t = plugin.transport.as_ref();
        let (_s, id) = attach(t, &format!(r#"{{"fail": "{fail}"}}"#));
        let (x, base) = inputs();
        let (_, call, message) = plugin_error(t.forward_linear(id, Q, &x, &base).unwrap_err());
        assert_eq!(call, "forward-linear", "{fail}");
        assert!(message.contains("handle"), "{fail} ({what}): {message}");
        // The host is unharmed and the plugin still answers.
        let (_s2, id2) = attach(t, "{}");
        t.forward_linear(id2, Q, &x, &base).unwrap();
    }
}

#[test]
fn a_wrongly_shaped_output_is_refused_naming_the_hook() {
    use whetstone_host::model::llama::Llama;
    use whetstone_host::model::{Mode, Model};
    use whetstone_host::plugin::conformance::tiny_config;
    use whetstone_host::plugin::method::MethodAdapter;
    let Some(manifest) = built() else { return };
    let model = Llama::random(&tiny_config(), &Device::Cpu, 3).unwrap();
    let plugin = Plugin::load(manifest, TransportKind::Wasm).unwrap();
    let config = serde_json::json!({"fail": "shape"});
    let _adapter = MethodAdapter::attach(&model, plugin, "default", config, 1).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let mask = ids.ones_like().unwrap();
    let err = model
        .forward(&ids, &mask, Mode::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin `echo`: forward-linear")
            && err.contains("q_proj")
            && err.contains("shape"),
        "{err}"
    );
}

/// A method whose loss term is NaN stops the step with an error naming the plugin and the
/// `loss-term` hook, before any update, on both transports.
#[test]
fn a_nan_loss_term_is_refused_naming_the_hook() {
    use whetstone_host::data::{collate, Example, ExampleLabels};
    use whetstone_host::model::llama::Llama;
    use whetstone_host::plugin::conformance::tiny_config;
    use whetstone_host::plugin::method::MethodAdapter;
    use whetstone_host::recipe::TrainingConfig;
    use whetstone_host::train::Trainer;
    let Some(manifest) = built() else { return };
    let example = Example {
        input_ids: vec![1, 2, 3, 4],
        labels: ExampleLabels::Tokens(vec![1, 2, 3, 4]),
    };
    let batch = collate(&[&example], 0, &Device::Cpu).unwrap();
    for kind in [TransportKind::Native, TransportKind::Wasm] {
        let model = Llama::random(&tiny_config(), &Device::Cpu, 3).unwrap();
        let plugin = Plugin::load(manifest, kind).unwrap();
        let config = serde_json::json!({"fail": "nan"});
        let adapter = MethodAdapter::attach(&model, plugin, "default", config, 1).unwrap();
        adapter.activate(&model).unwrap();
        let before: Vec<Vec<f32>> = adapter
            .params()
            .iter()
            .map(|p| p.tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let mut trainer =
            Trainer::with_method(&model, Some(adapter.clone()), &TrainingConfig::default(), 3)
                .unwrap();
        let err = trainer
            .train_step(&model, std::slice::from_ref(&batch))
            .unwrap_err();
        let Error::Plugin {
            plugin,
            call,
            message,
        } = &err
        else {
            panic!("{kind:?}: not a plugin error: {err}");
        };
        assert_eq!(
            (plugin.as_str(), call.as_str()),
            ("echo", "loss-term"),
            "{kind:?}"
        );
        assert!(message.contains("NaN"), "{kind:?}: {message}");
        let after: Vec<Vec<f32>> = adapter
            .params()
            .iter()
            .map(|p| p.tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        assert_eq!(before, after, "{kind:?}: no update after a refused step");
        assert_eq!(trainer.step(), 0, "{kind:?}");
    }
}

/// A component that imports WASI, another contract version or any interface outside the
/// contract is refused at load, naming the import, before any of its code runs.
#[test]
fn imports_outside_the_contract_are_refused_naming_the_import() {
    let dir = tempfile::tempdir().unwrap();
    for (import, expected) in [
        ("wasi:cli/environment@0.2.0", "no WASI"),
        ("wasi:filesystem/preopens@0.2.0", "no WASI"),
        (
            "whetstone:plugin/host@0.1.0",
            "(contract 0.1.0), this host speaks contract",
        ),
        ("evil:net/socket", "which Whetstone does not provide"),
    ] {
        let text = format!(
            r#"(component
                 (import "{import}" (instance (export "f" (func (result u32)))))
               )"#
        );
        let path = dir.path().join("hostile.wasm");
        std::fs::write(&path, wat::parse_str(&text).unwrap()).unwrap();
        let Err(err) = WasmPlugin::load("hostile", &path, Limits::default()) else {
            panic!("{import}: a hostile component must not load");
        };
        let err = err.to_string();
        assert!(
            err.contains("plugin `hostile`: load")
                && err.contains(&format!("`{import}`"))
                && err.contains(expected),
            "{import}: {err}"
        );
    }
}

/// A panic inside a native plugin's entry point becomes an error naming the call (the SDK
/// catches it at the C boundary), never an abort of the host; the host and the plugin's other
/// instances keep working.
#[test]
fn a_native_panic_is_an_error_not_an_abort() {
    let Some(manifest) = built() else { return };
    let plugin = Plugin::load(manifest, TransportKind::Native).unwrap();
    let t = plugin.transport.as_ref();
    let (_s, id) = attach(t, r#"{"fail": "panic"}"#);
    let (x, base) = inputs();
    let (_, call, message) = plugin_error(t.forward_linear(id, Q, &x, &base).unwrap_err());
    assert_eq!(call, "forward-linear");
    assert!(message.contains("echo was told to panic"), "{message}");
    let (_s2, healthy) = attach(t, "{}");
    t.forward_linear(healthy, Q, &x, &base).unwrap();
}
