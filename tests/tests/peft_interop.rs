//! Hugging Face PEFT interop (DESIGN.md principle 4), both directions, on the tiny fixtures of
//! `tests/fixtures/peft/` (written by `tests/reference/peft_interop.py generate`).
//!
//! - PEFT → Whetstone: the LoRA adapters Python PEFT saved load through `adapter::load` onto the
//!   fixture models and reproduce PEFT's outputs (max |Δ| ≤ 1e-4); merged into the base weights
//!   and written as a model directory, they reproduce the adapter model's logits (≤ 1e-5). The
//!   same for DoRA (the `lora` plugin with `use_dora`), IA3, LoHa and LoKr on the tiny Llama
//!   (`llama-<method>/`), each through its first-party plugin (`plugins/<id>`, built on first
//!   use).
//! - Whetstone → PEFT: adapters Whetstone creates (random A and B, a changed classifier; for the
//!   other methods every parameter perturbed away from its initial value) are saved with
//!   `adapter::save` together with Whetstone's outputs and the merged model
//!   (`adapter::write_merged`). Python cannot run here, so the check is a command:
//!
//!   ```sh
//!   WHETSTONE_PEFT_OUT=/tmp/peft-out cargo test -p whetstone-tests --test peft_interop
//!   python tests/reference/peft_interop.py check /tmp/peft-out
//!   ```
//!
//! BERT outputs are the classifier over the masked mean of the last hidden state (Whetstone's
//! head; Hugging Face's own head uses the tanh pooler, which Whetstone does not implement), plus
//! the last hidden state itself.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use whetstone_host::adapter::{self, AdapterSet};
use whetstone_host::model::bert::{BertConfig, BertForSequenceClassification};
use whetstone_host::model::load::{self, LoadedModel, ModelSpec, Pooling, TaskSpec};
use whetstone_host::model::{hf, Mode, Model};
use whetstone_host::plugin::discover;
use whetstone_host::plugin::method::MethodAdapter;
use whetstone_host::plugin::{Plugin, TransportKind};
use whetstone_tests::{lora_plugin, method_plugin, repo_root};

/// PEFT → Whetstone tolerance on outputs.
const INTEROP_TOL: f32 = 1e-4;
/// Merged model vs adapter model.
const MERGE_TOL: f32 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/peft").join(name)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

/// A `[batch, seq]` u32 tensor from a JSON array of arrays.
fn ids(value: &Value) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = serde_json::from_value(value.clone())?;
    let (b, s) = (rows.len(), rows.first().map(Vec::len).unwrap_or(0));
    let flat: Vec<u32> = rows.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, (b, s), &Device::Cpu)?)
}

/// A tensor of any rank from nested JSON arrays of numbers.
fn floats(value: &Value) -> Result<Tensor> {
    fn walk(v: &Value, shape: &mut Vec<usize>, depth: usize, out: &mut Vec<f32>) -> Result<()> {
        match v {
            Value::Array(items) => {
                if shape.len() == depth {
                    shape.push(items.len());
                }
                for item in items {
                    walk(item, shape, depth + 1, out)?;
                }
                Ok(())
            }
            Value::Number(n) => {
                out.push(n.as_f64().context("not a float")? as f32);
                Ok(())
            }
            other => anyhow::bail!("unexpected JSON value {other}"),
        }
    }
    let (mut shape, mut data) = (Vec::new(), Vec::new());
    walk(value, &mut shape, 0, &mut data)?;
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Max |a - b| over the positions where `mask` (`[batch, seq]`) is 1, for `[batch, seq, ...]`
/// tensors; over everything when `mask` is `None`.
fn max_diff(a: &Tensor, b: &Tensor, mask: Option<&Tensor>) -> Result<f32> {
    ensure!(
        a.dims() == b.dims(),
        "shapes {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    let mut d = (a - b)?.abs()?;
    if let Some(mask) = mask {
        let mut m = mask.to_dtype(DType::F32)?;
        while m.rank() < d.rank() {
            m = m.unsqueeze(m.rank())?;
        }
        d = d.broadcast_mul(&m)?;
    }
    Ok(d.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn forward(model: &dyn Model, inputs: &Value) -> Result<Tensor> {
    let (i, m) = (ids(&inputs["input_ids"])?, ids(&inputs["attention_mask"])?);
    Ok(model.forward(&i, &m, Mode::Eval)?)
}

fn load_model(name: &str, task: TaskSpec) -> Result<LoadedModel> {
    let spec = ModelSpec::new(fixture(name).join("model").to_string_lossy(), task);
    Ok(load::load(&spec, &Device::Cpu, 0)?)
}

/// First-party plugin `id`, native.
fn plugin(id: &str) -> Result<Plugin> {
    let manifest = discover::find(id, &[method_plugin(id)])?;
    Ok(Plugin::load(&manifest, TransportKind::Native)?)
}

/// Merges `adapter` into `loaded`, writes the result and checks that the merged model, and the
/// model read back from the written directory, give `expected` (the adapter model's logits).
fn check_merge(
    loaded: &LoadedModel,
    adapter: &MethodAdapter,
    task: TaskSpec,
    inputs: &Value,
    expected: &Tensor,
) -> Result<f32> {
    let mask = ids(&inputs["attention_mask"])?;
    let per_token = (task == TaskSpec::CausalLm).then_some(&mask);
    adapter::merge(loaded.model.as_ref(), adapter)?;
    let merged = forward(loaded.model.as_ref(), inputs)?;
    let in_memory = max_diff(&merged, expected, per_token)?;
    let out = tempfile::tempdir()?;
    adapter::write_merged(loaded, out.path())?;
    let spec = ModelSpec::new(out.path().to_string_lossy(), task);
    let reloaded = load::load(&spec, &Device::Cpu, 0)?;
    let written = max_diff(
        &forward(reloaded.model.as_ref(), inputs)?,
        expected,
        per_token,
    )?;
    eprintln!("merge: in memory {in_memory:.2e}, written and reloaded {written:.2e}");
    ensure!(
        in_memory <= MERGE_TOL && written <= MERGE_TOL,
        "merge error too large"
    );
    Ok(written)
}

#[test]
fn llama_lora_from_peft_reproduces_python() -> Result<()> {
    let expected = read_json(&fixture("llama").join("expected.json"))?;
    let loaded = load_model("llama", TaskSpec::CausalLm)?;
    let model = loaded.model.as_ref();
    let adapter = adapter::load(
        model,
        &fixture("llama").join("adapter"),
        "default",
        &[lora_plugin()],
    )?;
    assert_eq!(adapter.wrapped_modules().len(), 4);
    let logits = forward(model, &expected)?;
    let mask = ids(&expected["attention_mask"])?;
    let d = max_diff(&logits, &floats(&expected["logits"])?, Some(&mask))?;
    eprintln!("llama: max |Δlogits| PEFT → Whetstone = {d:.3e}");
    ensure!(d <= INTEROP_TOL, "llama logits differ from PEFT's by {d}");
    check_merge(&loaded, &adapter, TaskSpec::CausalLm, &expected, &logits)?;
    Ok(())
}

/// `llama-<method>`: the PEFT adapter loads through plugin `plugin_id` onto the fixture Llama,
/// wraps `wrapped` modules, reproduces PEFT's logits and merges.
fn method_from_peft(method: &str, plugin_id: &str, wrapped: usize) -> Result<()> {
    let name = format!("llama-{method}");
    let expected = read_json(&fixture(&name).join("expected.json"))?;
    let loaded = load_model("llama", TaskSpec::CausalLm)?;
    let model = loaded.model.as_ref();
    let adapter = adapter::load(
        model,
        &fixture(&name).join("adapter"),
        "default",
        &[method_plugin(plugin_id)],
    )?;
    assert_eq!(adapter.wrapped_modules().len(), wrapped);
    let logits = forward(model, &expected)?;
    let mask = ids(&expected["attention_mask"])?;
    let d = max_diff(&logits, &floats(&expected["logits"])?, Some(&mask))?;
    eprintln!("{name}: max |Δlogits| PEFT → Whetstone = {d:.3e}");
    ensure!(d <= INTEROP_TOL, "{name} logits differ from PEFT's by {d}");
    check_merge(&loaded, &adapter, TaskSpec::CausalLm, &expected, &logits)?;
    Ok(())
}

#[test]
fn llama_dora_from_peft_reproduces_python() -> Result<()> {
    method_from_peft("dora", "lora", 4)
}

#[test]
fn llama_ia3_from_peft_reproduces_python() -> Result<()> {
    method_from_peft("ia3", "ia3", 6)
}

#[test]
fn llama_loha_from_peft_reproduces_python() -> Result<()> {
    method_from_peft("loha", "loha", 4)
}

#[test]
fn llama_lokr_from_peft_reproduces_python() -> Result<()> {
    method_from_peft("lokr", "lokr", 4)
}

/// The fixture BERT as the concrete type (for its hidden states), mean pooling.
fn concrete_bert() -> Result<BertForSequenceClassification> {
    let dir = fixture("bert").join("model");
    let config = BertConfig::from_json(&hf::read_config(&dir)?, &dir.join("config.json"))?;
    let tensors = hf::load_weights(&dir, &Device::Cpu)?;
    Ok(BertForSequenceClassification::from_tensors(
        &config,
        tensors,
        &dir,
        2,
        Pooling::Mean,
        &Device::Cpu,
        0,
    )?)
}

#[test]
fn bert_lora_with_saved_head_from_peft_reproduces_python() -> Result<()> {
    let expected = read_json(&fixture("bert").join("expected.json"))?;
    let bert = concrete_bert()?;
    let adapter = adapter::load(
        &bert,
        &fixture("bert").join("adapter"),
        "default",
        &[lora_plugin()],
    )?;
    assert_eq!(adapter.wrapped_modules().len(), 4);
    assert_eq!(adapter.base_params().len(), 2, "classifier weight and bias");
    let (i, m) = (
        ids(&expected["input_ids"])?,
        ids(&expected["attention_mask"])?,
    );
    let hidden = bert.encode(&i, &m, Mode::Eval)?;
    let dh = max_diff(&hidden, &floats(&expected["hidden"])?, Some(&m))?;
    let logits = bert.forward(&i, &m, Mode::Eval)?;
    let dl = max_diff(&logits, &floats(&expected["logits"])?, None)?;
    eprintln!("bert: max |Δ| PEFT → Whetstone: hidden {dh:.3e}, logits {dl:.3e}");
    ensure!(
        dh <= INTEROP_TOL && dl <= INTEROP_TOL,
        "bert differs from PEFT"
    );

    let loaded = load_model("bert", TaskSpec::Classification)?;
    let model = loaded.model.as_ref();
    let adapter = adapter::load(
        model,
        &fixture("bert").join("adapter"),
        "default",
        &[lora_plugin()],
    )?;
    let logits = forward(model, &expected)?;
    ensure!(max_diff(&logits, &floats(&expected["logits"])?, None)? <= INTEROP_TOL);
    check_merge(
        &loaded,
        &adapter,
        TaskSpec::Classification,
        &expected,
        &logits,
    )?;
    Ok(())
}

#[test]
fn adapters_switch_by_name() -> Result<()> {
    let expected = read_json(&fixture("bert").join("expected.json"))?;
    let loaded = load_model("bert", TaskSpec::Classification)?;
    let model = loaded.model.as_ref();
    let base = forward(model, &expected)?;
    let mut set = AdapterSet::new();
    let dir = fixture("bert").join("adapter");
    set.load(model, &dir, "peft", &[lora_plugin()])?;
    let with_peft = forward(model, &expected)?;
    // A second adapter: the same file with every B and the classifier's weight scaled (its own
    // head), the head under PEFT's in-memory key.
    let second = tempfile::tempdir()?;
    std::fs::copy(
        dir.join("adapter_config.json"),
        second.path().join("adapter_config.json"),
    )?;
    let mut tensors =
        hf::load_safetensors_file(&dir.join("adapter_model.safetensors"), &Device::Cpu)?;
    for (key, t) in tensors.iter_mut() {
        if key.contains("lora_B") {
            *t = (&*t * -1.0)?;
        }
    }
    let head = "base_model.model.classifier.modules_to_save.default.weight";
    let w = tensors
        .remove("base_model.model.classifier.weight")
        .context("head")?;
    tensors.insert(head.into(), (w * 2.0)?);
    candle_core::safetensors::save(&tensors, second.path().join("adapter_model.safetensors"))?;
    set.load(model, second.path(), "scaled", &[lora_plugin()])?;
    assert_eq!(set.names(), ["peft", "scaled"]);
    assert_eq!(set.active(), Some("scaled"));
    let with_scaled = forward(model, &expected)?;
    ensure!(
        max_diff(&with_scaled, &with_peft, None)? > 1e-3,
        "the heads differ"
    );
    set.activate(model, "peft")?;
    ensure!(max_diff(&forward(model, &expected)?, &with_peft, None)? == 0.0);
    set.activate(model, "scaled")?;
    ensure!(max_diff(&forward(model, &expected)?, &with_scaled, None)? == 0.0);
    set.deactivate(model)?;
    ensure!(max_diff(&forward(model, &expected)?, &base, None)? == 0.0);
    let err = set.activate(model, "nope").unwrap_err().to_string();
    assert!(
        err.contains("nope") && err.contains("peft, scaled"),
        "{err}"
    );
    Ok(())
}

#[test]
fn mismatched_adapter_files_name_the_keys() -> Result<()> {
    let loaded = load_model("llama", TaskSpec::CausalLm)?;
    let model = loaded.model.as_ref();
    let dir = fixture("llama").join("adapter");
    let bad = tempfile::tempdir()?;
    std::fs::copy(
        dir.join("adapter_config.json"),
        bad.path().join("adapter_config.json"),
    )?;
    let mut tensors =
        hf::load_safetensors_file(&dir.join("adapter_model.safetensors"), &Device::Cpu)?;
    let gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    let t = tensors.remove(gone).context("fixture key")?;
    tensors.insert(
        "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight".into(),
        t,
    );
    candle_core::safetensors::save(&tensors, bad.path().join("adapter_model.safetensors"))?;
    let err = adapter::load(model, bad.path(), "default", &[lora_plugin()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("k_proj.lora_B.weight") && err.contains(gone),
        "{err}"
    );
    assert!(
        model.linears().iter().all(|l| !l.has_hook()),
        "hooks removed on failure"
    );
    Ok(())
}

/// Logits `[batch, labels]` or `[batch, seq, vocab]` as nested JSON arrays.
fn to_json(t: &Tensor) -> Result<Value> {
    Ok(match t.rank() {
        2 => json!(t.to_vec2::<f32>()?),
        3 => json!(t.to_vec3::<f32>()?),
        r => anyhow::bail!("unexpected rank {r}"),
    })
}

/// Where the adapters for the Python check go: `$WHETSTONE_PEFT_OUT`, else a temporary
/// directory.
fn out_dir() -> Result<(Option<tempfile::TempDir>, PathBuf)> {
    match std::env::var_os("WHETSTONE_PEFT_OUT") {
        Some(dir) => Ok((None, PathBuf::from(dir))),
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_path_buf();
            Ok((Some(t), p))
        }
    }
}

/// Deterministic noise in `[-1, 1)` shaped like `t` (a xorshift stream from `seed`).
fn noise_like(t: &Tensor, seed: u64) -> Result<Tensor> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let values: Vec<f32> = (0..t.elem_count())
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(values, t.dims(), t.device())?.to_dtype(t.dtype())?)
}

/// What a Whetstone adapter for the reverse check is: the plugin, its configuration, and
/// whether its own parameters are perturbed (`p · (1 + 0.2·u) + 0.05·v`, `u`, `v` noise) so
/// that none is at its initial value (IA3's ones, DoRA's weight norms, zero factors).
struct ForPython<'a> {
    /// The output folder under `$WHETSTONE_PEFT_OUT` (a fixture name).
    name: &'a str,
    /// The fixture whose model and inputs are used.
    base: &'a str,
    task: TaskSpec,
    plugin: &'a str,
    config: Value,
    perturb: bool,
}

/// Attaches the method on the fixture model, saves it as PEFT does with Whetstone's outputs,
/// and checks the saved adapter loads back to the same outputs.
fn write_for_python(spec: ForPython<'_>, out: &Path) -> Result<()> {
    let ForPython {
        name,
        base,
        task,
        plugin: plugin_id,
        config,
        perturb,
    } = spec;
    let inputs = read_json(&fixture(base).join("expected.json"))?;
    let loaded = load_model(base, task)?;
    let model = loaded.model.as_ref();
    let method = MethodAdapter::attach(model, plugin(plugin_id)?, "default", config, 7)?;
    if perturb {
        for (i, p) in method.params().iter().enumerate() {
            let t = p.tensor();
            let u = noise_like(&t, 2 * i as u64 + 1)?;
            let v = noise_like(&t, 2 * i as u64 + 2)?;
            let scaled = t.mul(&((u * 0.2)? + 1.0)?)?;
            p.set_value(&(scaled + (v * 0.05)?)?)?;
        }
    }
    for p in method.base_params() {
        // A trained head differs from the base one.
        p.set_value(&(p.tensor() * -1.5)?)?;
    }
    let logits = forward(model, &inputs)?;
    let dir = out.join(name);
    let model_path = fixture(base).join("model");
    adapter::save(
        model,
        &method,
        &model_path.to_string_lossy(),
        &dir.join("adapter"),
    )?;
    let ours = json!({
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "logits": to_json(&logits)?,
    });
    std::fs::write(dir.join("ours.json"), serde_json::to_string(&ours)?)?;

    let fresh = load_model(base, task)?;
    adapter::load(
        fresh.model.as_ref(),
        &dir.join("adapter"),
        "default",
        &[method_plugin(plugin_id)],
    )?;
    let again = forward(fresh.model.as_ref(), &inputs)?;
    ensure!(
        max_diff(&again, &logits, None)? == 0.0,
        "{name}: save/load round trip differs"
    );

    // The merged model too, for Python to load with plain transformers.
    adapter::merge(model, &method)?;
    adapter::write_merged(&loaded, &dir.join("merged"))?;
    let mask = ids(&inputs["attention_mask"])?;
    let per_token = (task == TaskSpec::CausalLm).then_some(&mask);
    let merged = forward(model, &inputs)?;
    let d = max_diff(&merged, &logits, per_token)?;
    eprintln!("{name}: merged vs adapter model (Whetstone) {d:.2e}");
    ensure!(d <= MERGE_TOL, "{name}: merge differs by {d}");
    Ok(())
}

/// `llama-<name>` for the reverse check: `plugin_id` with `config`, parameters perturbed.
fn llama_for_python(name: &str, plugin_id: &str, config: Value) -> Result<()> {
    let (_keep, out) = out_dir()?;
    write_for_python(
        ForPython {
            name: &format!("llama-{name}"),
            base: "llama",
            task: TaskSpec::CausalLm,
            plugin: plugin_id,
            config,
            perturb: true,
        },
        &out,
    )
}

#[test]
fn whetstone_adapters_for_peft() -> Result<()> {
    let (_keep, out) = out_dir()?;
    write_for_python(
        ForPython {
            name: "llama",
            base: "llama",
            task: TaskSpec::CausalLm,
            plugin: "lora",
            config: json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                           "init_lora_weights": false}),
            perturb: false,
        },
        &out,
    )?;
    write_for_python(
        ForPython {
            name: "bert",
            base: "bert",
            task: TaskSpec::Classification,
            plugin: "lora",
            config: json!({"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
                           "init_lora_weights": false, "modules_to_save": ["classifier"]}),
            perturb: false,
        },
        &out,
    )?;
    eprintln!(
        "adapters for the reverse check in {}: run `python tests/reference/peft_interop.py check {}`",
        out.display(),
        out.display()
    );
    Ok(())
}

#[test]
fn whetstone_dora_adapter_for_peft() -> Result<()> {
    llama_for_python(
        "dora",
        "lora",
        json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
               "use_dora": true, "init_lora_weights": false}),
    )
}

#[test]
fn whetstone_ia3_adapter_for_peft() -> Result<()> {
    llama_for_python(
        "ia3",
        "ia3",
        json!({"target_modules": ["k_proj", "v_proj", "down_proj"],
               "feedforward_modules": ["down_proj"]}),
    )
}

#[test]
fn whetstone_loha_adapter_for_peft() -> Result<()> {
    llama_for_python(
        "loha",
        "loha",
        json!({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    )
}

#[test]
fn whetstone_lokr_adapter_for_peft() -> Result<()> {
    llama_for_python(
        "lokr",
        "lokr",
        json!({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    )
}
