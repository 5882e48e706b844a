//! One loaded native library serving models on several threads. In its own test binary (its
//! own process): the conformance suite's handle-leak check counts a library's live handles, so
//! it must not share the library with a concurrent user.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use serde_json::json;
use whetstone_host::plugin::build::{self, BuildOptions};
use whetstone_host::plugin::{Manifest, TransportKind};

/// The LoRA plugin's native build in a temporary plugin folder.
fn lora(out: &Path) -> Manifest {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/lora");
    let opts = BuildOptions {
        native: true,
        wasm: false,
        out_dir: Some(out.to_path_buf()),
        release: false,
    };
    build::build(&crate_dir, &opts).unwrap()
}

/// One loaded native library serves two models trained on two threads at once: each call runs
/// against its own model's session (a regression test: the session used to be switched without
/// holding the plugin, so a concurrent attach made the other thread's parameter lookups fail).
#[test]
fn one_plugin_serves_models_on_several_threads() {
    use candle_core::{Device, Tensor};
    use whetstone_host::model::llama::Llama;
    use whetstone_host::model::{Mode, Model};
    use whetstone_host::plugin::method::MethodAdapter;
    use whetstone_host::plugin::Plugin;

    let out = tempfile::tempdir().unwrap();
    let plugin = Plugin::load(&lora(out.path()), TransportKind::Native).unwrap();
    let config = whetstone_host::plugin::conformance::tiny_config();
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let plugin = plugin.clone();
            let config = config.clone();
            std::thread::spawn(move || {
                let model = Llama::random(&config, &Device::Cpu, 7 + t).unwrap();
                // Different targets per thread: a call served from the other thread's session
                // would look up parameters that session does not have.
                let target = if t == 0 { "q_proj" } else { "v_proj" };
                let lora = json!({"r": 2, "lora_alpha": 4, "init_lora_weights": false, "target_modules": [target]});
                let _adapter = MethodAdapter::attach(&model, plugin, "default", lora, t).unwrap();
                let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
                let mask = Tensor::ones((1, 4), candle_core::DType::U32, &Device::Cpu).unwrap();
                for _ in 0..25 {
                    let logits = model.forward(&ids, &mask, Mode::Train).unwrap();
                    let loss = logits.sqr().unwrap().mean_all().unwrap();
                    loss.backward().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a thread failed");
    }
}
