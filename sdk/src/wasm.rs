//! The WebAssembly transport: bindings generated from the WIT package `wit/0.2.0`, host calls
//! through its imports, and [`Component`], whose `plugin` exports adapt to [`crate::runtime`].

use std::marker::PhantomData;

use crate::runtime::{self, Provider};
use crate::types::{DType, Event, Init, LinearInfo, Mode, ModelInfo, Op};
use crate::{Error, Result, Tensor};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit/0.2.0",
        world: "whetstone-plugin",
        pub_export_macro: true,
        export_macro_name: "export_whetstone_plugin",
        default_bindings_module: "::whetstone_sdk::__private::wasm::bindings",
        runtime_path: "::whetstone_sdk::__private::wasm::wit_bindgen_rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen::rt as wit_bindgen_rt;

use bindings::exports::whetstone::plugin::plugin as exports;
use bindings::whetstone::plugin::{host as imports, types as wit};

fn host_err(message: String) -> Error {
    Error::Host(message)
}

/// Host calls (the `sys` layer for wasm32 builds).
pub(crate) mod host {
    use super::*;

    pub(crate) fn tensor_op(op: Op, inputs: &[u64], ints: &[i64], floats: &[f64]) -> Result<u64> {
        // SAFETY: `Op` codes are the WIT enum's case indices in order (checked by the host's
        // contract test), so every code is a valid case.
        let wit_op = unsafe { wit::Op::_lift(op as u8) };
        imports::tensor_op(wit_op, inputs, ints, floats).map_err(host_err)
    }

    pub(crate) fn shape(t: u64) -> Result<Vec<usize>> {
        imports::shape(t)
            .map(|dims| dims.into_iter().map(|d| d as usize).collect())
            .map_err(host_err)
    }

    pub(crate) fn dtype(t: u64) -> Result<DType> {
        let d = imports::dtype(t).map_err(host_err)?;
        Ok(match d {
            wit::Dtype::F32 => DType::F32,
            wit::Dtype::F16 => DType::F16,
            wit::Dtype::Bf16 => DType::Bf16,
            wit::Dtype::F64 => DType::F64,
            wit::Dtype::U8 => DType::U8,
            wit::Dtype::U32 => DType::U32,
            wit::Dtype::I64 => DType::I64,
        })
    }

    pub(crate) fn to_vec(t: u64) -> Result<Vec<f32>> {
        imports::to_vec(t).map_err(host_err)
    }

    pub(crate) fn from_vec(data: &[f32], shape: &[usize]) -> Result<u64> {
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        imports::from_vec(data, &dims).map_err(host_err)
    }

    pub(crate) fn release(t: u64) {
        imports::release(t)
    }

    pub(crate) fn add_param(module: &str, name: &str, shape: &[usize], init: Init) -> Result<u64> {
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let init = match init {
            Init::Zeros => wit::Init::Zeros,
            Init::Ones => wit::Init::Ones,
            Init::Constant(v) => wit::Init::Constant(v),
            Init::Normal { mean, std } => wit::Init::Normal((mean, std)),
            Init::Uniform { low, high } => wit::Init::Uniform((low, high)),
            Init::KaimingUniform { a } => wit::Init::KaimingUniform(a),
            Init::FromTensor(t) => wit::Init::FromTensor(t),
        };
        imports::add_param(module, name, &dims, init).map_err(host_err)
    }

    pub(crate) fn param(module: &str, name: &str) -> Result<u64> {
        imports::param(module, name).map_err(host_err)
    }

    pub(crate) fn base_param(name: &str) -> Result<u64> {
        imports::base_param(name).map_err(host_err)
    }

    pub(crate) fn grad(t: u64) -> Result<Option<u64>> {
        imports::grad(t).map_err(host_err)
    }

    pub(crate) fn mode() -> Mode {
        match imports::mode() {
            wit::Mode::Train => Mode::Train,
            wit::Mode::Eval => Mode::Eval,
        }
    }

    pub(crate) fn step() -> u64 {
        imports::step()
    }

    pub(crate) fn log(level: u8, message: &str) {
        imports::log(level, message)
    }

    pub(crate) fn file_count() -> u32 {
        imports::file_count()
    }

    pub(crate) fn file_name(index: u32) -> Result<String> {
        imports::file_name(index).map_err(host_err)
    }

    pub(crate) fn read_file(index: u32, offset: u64, len: u32) -> Result<Vec<u8>> {
        imports::read_file(index, offset, len).map_err(host_err)
    }
}

/// Installs the plugin's factory and, once, a panic hook that sends the panic message to the
/// host's log: a wasm32 plugin aborts on panic (the host sees a trap), so the log line is where
/// the message survives.
fn setup<P: Provider>() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    runtime::install::<P>();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| imports::log(0, &info.to_string())));
    });
}

fn out<T>(call: &str, f: impl FnOnce() -> Result<T>) -> std::result::Result<T, String> {
    runtime::guard(call, f).map_err(|e| e.to_string())
}

fn linear_info(l: wit::LinearInfo) -> LinearInfo {
    LinearInfo {
        name: l.name,
        in_features: l.in_features as usize,
        out_features: l.out_features as usize,
        has_bias: l.has_bias,
        layer_index: l.layer_index.map(|i| i as usize),
    }
}

/// The component's exports for the plugin registered as `P`.
#[doc(hidden)]
pub struct Component<P>(PhantomData<P>);

impl<P: Provider> exports::Guest for Component<P> {
    fn metadata() -> String {
        setup::<P>();
        runtime::metadata().unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }

    fn create_method(config: String) -> std::result::Result<u32, String> {
        setup::<P>();
        out("create-method", || runtime::create_method(&config))
    }

    fn init_model(instance: u32, m: wit::ModelInfo) -> std::result::Result<(), String> {
        let info = ModelInfo {
            architecture: m.architecture,
            task: m.task,
            hidden_size: m.hidden_size as usize,
            num_layers: m.num_layers as usize,
            num_attention_heads: m.num_attention_heads as usize,
            num_key_value_heads: m.num_key_value_heads as usize,
            head_dim: m.head_dim as usize,
            vocab_size: m.vocab_size as usize,
        };
        out("init-model", || runtime::init_model(instance, &info))
    }

    fn select_linear(instance: u32, linear: wit::LinearInfo) -> std::result::Result<bool, String> {
        out("select-linear", || {
            runtime::select_linear(instance, &linear_info(linear))
        })
    }

    fn init_linear(instance: u32, linear: wit::LinearInfo) -> std::result::Result<(), String> {
        out("init-linear", || {
            runtime::init_linear(instance, linear_info(linear))
        })
    }

    fn forward_linear(
        instance: u32,
        module: String,
        x: u64,
        base_out: u64,
    ) -> std::result::Result<u64, String> {
        out("forward-linear", || {
            runtime::forward_linear(
                instance,
                &module,
                Tensor::from_handle(x),
                Tensor::from_handle(base_out),
            )
            .map(Tensor::into_handle)
        })
    }

    fn delta_weight(instance: u32, module: String) -> std::result::Result<Option<u64>, String> {
        out("delta-weight", || {
            Ok(runtime::delta_weight(instance, &module)?.map(Tensor::into_handle))
        })
    }

    fn forward_embeddings(
        instance: u32,
        embeddings: u64,
        attention_mask: u64,
    ) -> std::result::Result<Option<wit::Embedded>, String> {
        out("forward-embeddings", || {
            let pair = runtime::forward_embeddings(
                instance,
                Tensor::from_handle(embeddings),
                Tensor::from_handle(attention_mask),
            )?;
            Ok(pair.map(|(e, m)| wit::Embedded {
                embeddings: e.into_handle(),
                attention_mask: m.into_handle(),
            }))
        })
    }

    fn attention_prefix(
        instance: u32,
        layer: u32,
        batch: u32,
    ) -> std::result::Result<Option<wit::Prefix>, String> {
        out("attention-prefix", || {
            let pair = runtime::attention_prefix(instance, layer, batch)?;
            Ok(pair.map(|(k, v)| wit::Prefix {
                key: k.into_handle(),
                value: v.into_handle(),
            }))
        })
    }

    fn trainable_base_params(
        instance: u32,
        names: Vec<String>,
    ) -> std::result::Result<Vec<String>, String> {
        out("trainable-base-params", || {
            runtime::trainable_base_params(instance, &names)
        })
    }

    fn loss_term(instance: u32) -> std::result::Result<Option<u64>, String> {
        out("loss-term", || {
            Ok(runtime::loss_term(instance)?.map(Tensor::into_handle))
        })
    }

    fn on_event(instance: u32, event: wit::Event) -> std::result::Result<(), String> {
        let event = match event {
            wit::Event::TrainStart => Event::TrainStart,
            wit::Event::StepEnd((step, loss)) => Event::StepEnd { step, loss },
            wit::Event::EpochEnd(epoch) => Event::EpochEnd(epoch),
            wit::Event::TrainEnd => Event::TrainEnd,
            wit::Event::TaskStart(task) => Event::TaskStart(task),
            wit::Event::TaskGradient((task, example)) => Event::TaskGradient { task, example },
            wit::Event::TaskEnd(task) => Event::TaskEnd(task),
        };
        out("on-event", || runtime::on_event(instance, &event))
    }

    fn task_gradient_examples(instance: u32) -> std::result::Result<u32, String> {
        out("task-gradient-examples", || {
            runtime::task_gradient_examples(instance)
        })
    }

    fn create_loss(config: String) -> std::result::Result<u32, String> {
        setup::<P>();
        out("create-loss", || runtime::create_loss(&config))
    }

    fn compute_loss(
        instance: u32,
        logits: u64,
        labels: u64,
        mask: u64,
        teacher_logits: Option<u64>,
    ) -> std::result::Result<u64, String> {
        out("compute-loss", || {
            runtime::compute_loss(
                instance,
                Tensor::from_handle(logits),
                Tensor::from_handle(labels),
                Tensor::from_handle(mask),
                teacher_logits.map(Tensor::from_handle),
            )
            .map(Tensor::into_handle)
        })
    }

    fn create_loader(config: String) -> std::result::Result<u32, String> {
        setup::<P>();
        out("create-loader", || runtime::create_loader(&config))
    }

    fn next_record(instance: u32) -> std::result::Result<Option<String>, String> {
        out("next-record", || runtime::next_record(instance))
    }
}
