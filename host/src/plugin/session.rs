//! What plugin calls act on: the handle table of one loaded plugin and the model session it is
//! attached to (base parameters, the plugin's own parameters, the forward context, data files).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use whetstone_sdk::{Init, Op};

use super::ops;
use crate::model::hooks::ForwardContext;
use crate::params::{Param, ParamStore};

type R<T> = std::result::Result<T, String>;

/// The parameters a plugin created, in creation order, under their PEFT keys (without the
/// `base_model.model.` prefix).
#[derive(Debug, Default)]
pub struct AdapterParams {
    order: Vec<Arc<Param>>,
    by_key: HashMap<String, Arc<Param>>,
    /// Keys of the parameters created without a module (prompt tuning's `prompt_embeddings`),
    /// which PEFT saves under their bare name.
    model_level: std::collections::HashSet<String>,
}

impl AdapterParams {
    /// All parameters in creation order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Param>> {
        self.order.iter()
    }

    /// The parameter with PEFT key `key`.
    pub fn get(&self, key: &str) -> Option<&Arc<Param>> {
        self.by_key.get(key)
    }

    /// Whether parameter `key` belongs to the model rather than to a module (it was created
    /// with an empty module name).
    pub fn is_model_level(&self, key: &str) -> bool {
        self.model_level.contains(key)
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Total scalar count.
    pub fn num_elements(&self) -> usize {
        self.order.iter().map(|p| p.elem_count()).sum()
    }

    fn insert(&mut self, param: Arc<Param>, model_level: bool) -> R<()> {
        let key = param.name().to_string();
        if self.by_key.contains_key(&key) {
            return Err(format!("parameter `{key}` already exists"));
        }
        if model_level {
            self.model_level.insert(key.clone());
        }
        self.order.push(param.clone());
        self.by_key.insert(key, param);
        Ok(())
    }
}

/// A model a plugin instance is attached to.
#[derive(Debug)]
pub struct Session {
    /// The model's device.
    pub device: Device,
    /// The base model's parameters.
    pub base: ParamStore,
    /// The forward context of the model (mode, step, generator).
    pub ctx: Arc<ForwardContext>,
    /// Parameters the plugin created.
    pub params: Mutex<AdapterParams>,
    /// Data files a loader may read.
    pub files: Vec<PathBuf>,
}

impl Session {
    /// A session over a model's parameters and forward context.
    pub fn new(device: Device, base: ParamStore, ctx: Arc<ForwardContext>) -> Session {
        Session {
            device,
            base,
            ctx,
            params: Mutex::new(AdapterParams::default()),
            files: Vec::new(),
        }
    }

    /// A session without a model, for a data loader reading `files`.
    pub fn for_files(files: Vec<PathBuf>) -> Session {
        Session {
            files,
            ..Session::new(
                Device::Cpu,
                ParamStore::default(),
                Arc::new(ForwardContext::default()),
            )
        }
    }

    /// Runs `f` on the plugin-created parameters.
    pub fn with_params<T>(&self, f: impl FnOnce(&mut AdapterParams) -> T) -> T {
        let mut guard = self.params.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

/// Host-side state of one loaded plugin: its live handles and the session its calls act on.
/// Both transports implement their host functions with these methods.
#[derive(Debug, Default)]
pub struct HostState {
    handles: HashMap<u64, Tensor>,
    next_handle: u64,
    session: Option<Arc<Session>>,
    /// The high-water mark of live handles, for leak diagnostics.
    pub peak_handles: usize,
}

/// Most live handles a plugin may hold at once (a leak guard).
pub const MAX_HANDLES: usize = 1 << 20;

impl HostState {
    /// Attaches (or with `None` detaches) the session calls act on.
    pub fn set_session(&mut self, session: Option<Arc<Session>>) {
        self.session = session;
    }

    /// The attached session.
    pub fn session(&self) -> R<&Arc<Session>> {
        self.session
            .as_ref()
            .ok_or_else(|| "no model is attached to this plugin yet".to_string())
    }

    /// Registers `t` and returns its new handle.
    pub fn insert(&mut self, t: Tensor) -> R<u64> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(format!(
                "the plugin holds {MAX_HANDLES} live tensor handles; it is leaking them"
            ));
        }
        self.next_handle += 1;
        self.handles.insert(self.next_handle, t);
        self.peak_handles = self.peak_handles.max(self.handles.len());
        Ok(self.next_handle)
    }

    /// The tensor behind `h`.
    pub fn get(&self, h: u64) -> R<&Tensor> {
        self.handles
            .get(&h)
            .ok_or_else(|| format!("unknown or released tensor handle {h}"))
    }

    /// Removes `h` and returns its tensor (a handle the plugin hands back to the host).
    pub fn take(&mut self, h: u64) -> R<Tensor> {
        self.handles
            .remove(&h)
            .ok_or_else(|| format!("unknown or released tensor handle {h}"))
    }

    /// Gives a handle back (unknown handles are ignored: release is idempotent).
    pub fn release(&mut self, h: u64) {
        self.handles.remove(&h);
    }

    /// Number of live handles.
    pub fn live_handles(&self) -> usize {
        self.handles.len()
    }

    /// `tensor-op`.
    pub fn tensor_op(&mut self, op: Op, inputs: &[u64], ints: &[i64], floats: &[f64]) -> R<u64> {
        let tensors = inputs
            .iter()
            .map(|&h| self.get(h).cloned())
            .collect::<R<Vec<_>>>()?;
        let session = self.session()?.clone();
        let out = ops::apply(op, &tensors, ints, floats, &session.device, &session.ctx)
            .map_err(|e| format!("{}: {e}", op.name()))?;
        self.insert(out)
    }

    /// `shape`.
    pub fn shape(&self, h: u64) -> R<Vec<u64>> {
        Ok(self.get(h)?.dims().iter().map(|&d| d as u64).collect())
    }

    /// `dtype`.
    pub fn dtype(&self, h: u64) -> R<whetstone_sdk::DType> {
        let t = self.get(h)?;
        ops::from_candle(t.dtype())
            .ok_or_else(|| format!("dtype {:?} is not in the contract", t.dtype()))
    }

    /// `to-vec`.
    pub fn to_vec(&self, h: u64) -> R<Vec<f32>> {
        let t = self.get(h)?;
        if t.elem_count() > ops::MAX_READ_ELEMENTS {
            return Err(format!(
                "to-vec of {} elements exceeds the limit of {} (read small tensors only)",
                t.elem_count(),
                ops::MAX_READ_ELEMENTS
            ));
        }
        t.flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())
    }

    /// `from-vec`.
    pub fn from_vec(&mut self, data: &[f32], shape: &[u64]) -> R<u64> {
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let device = self.session()?.device.clone();
        let t = Tensor::from_slice(data, dims.as_slice(), &device).map_err(|e| e.to_string())?;
        self.insert(t)
    }

    fn init_value(&self, shape: &[usize], init: Init) -> R<Tensor> {
        use rand::Rng;
        let session = self.session()?;
        let device = &session.device;
        let n: usize = shape.iter().product();
        let e = |e: candle_core::Error| e.to_string();
        let uniform = |low: f64, high: f64| -> R<Tensor> {
            let values: Vec<f32> = session.ctx.with_rng(|rng| {
                (0..n)
                    .map(|_| (low + (high - low) * rng.random::<f64>()) as f32)
                    .collect()
            });
            Tensor::from_vec(values, shape, device).map_err(e)
        };
        match init {
            Init::Zeros => Tensor::zeros(shape, candle_core::DType::F32, device).map_err(e),
            Init::Ones => Tensor::ones(shape, candle_core::DType::F32, device).map_err(e),
            Init::Constant(v) => Tensor::full(v as f32, shape, device).map_err(e),
            Init::Normal { mean, std } => {
                let like = Tensor::zeros(shape, candle_core::DType::F32, device).map_err(e)?;
                ops::randn(&like, mean, std, &session.ctx)
            }
            Init::Uniform { low, high } => uniform(low, high),
            Init::KaimingUniform { a } => {
                let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
                let gain = (2.0 / (1.0 + a * a)).sqrt();
                let bound = gain * (3.0 / fan_in as f64).sqrt();
                uniform(-bound, bound)
            }
            Init::FromTensor(h) => {
                let t = self.get(h)?.detach();
                if t.dims() != shape {
                    return Err(format!(
                        "from-tensor init: the tensor has shape {:?}, the parameter {shape:?}",
                        t.dims()
                    ));
                }
                t.to_dtype(candle_core::DType::F32)
                    .and_then(|t| t.copy())
                    .map_err(e)
            }
        }
    }

    /// `add-param`: a new trainable parameter `<module>.<name>`.
    pub fn add_param(&mut self, module: &str, name: &str, shape: &[u64], init: Init) -> R<u64> {
        if name.is_empty() {
            return Err("add-param: the parameter name is empty".into());
        }
        let key = key(module, name);
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        if dims.contains(&0) {
            return Err(format!(
                "add-param `{key}`: shape {dims:?} has a zero dimension"
            ));
        }
        let value = self.init_value(&dims, init)?;
        let param = Arc::new(Param::frozen(key.clone(), value));
        param.set_trainable(true).map_err(|e| e.to_string())?;
        let session = self.session()?.clone();
        session.with_params(|p| p.insert(param.clone(), module.is_empty()))?;
        self.insert(param.tensor())
    }

    /// `param`.
    pub fn param(&mut self, module: &str, name: &str) -> R<u64> {
        let key = key(module, name);
        let session = self.session()?.clone();
        let value = session
            .with_params(|p| p.get(&key).map(|p| p.tensor()))
            .ok_or_else(|| format!("no parameter `{key}`: create it with add-param first"))?;
        // While evaluating nothing is differentiated (except in a task's gradient pass): a
        // detached value keeps candle from recording (and keeping alive) the whole forward
        // graph behind every wrapped module.
        let value =
            if session.ctx.mode() == crate::model::Mode::Eval && !session.ctx.in_gradient_pass() {
                value.detach()
            } else {
                value
            };
        self.insert(value)
    }

    /// `base-param`.
    pub fn base_param(&mut self, name: &str) -> R<u64> {
        let session = self.session()?.clone();
        let param = session
            .base
            .get(name)
            .map_err(|_| format!("the base model has no parameter `{name}`"))?;
        self.insert(param.tensor())
    }

    /// `grad`: the gradient of the parameter behind handle `t` in the gradients the host
    /// published for the current task-gradient event.
    pub fn grad(&mut self, t: u64) -> R<Option<u64>> {
        let session = self.session()?.clone();
        let param = self
            .handles
            .get(&t)
            .ok_or_else(|| format!("grad: unknown or released tensor handle {t}"))?
            .clone();
        match session.ctx.gradient_of(&param)? {
            Some(g) => self.insert(g).map(Some),
            None => Ok(None),
        }
    }

    /// `file-name`.
    pub fn file_name(&self, index: u32) -> R<String> {
        let session = self.session()?;
        session
            .files
            .get(index as usize)
            .map(|p| p.display().to_string())
            .ok_or_else(|| format!("no data file {index}"))
    }

    /// `read-file`.
    pub fn read_file(&self, index: u32, offset: u64, len: u32) -> R<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let session = self.session()?;
        let path = session
            .files
            .get(index as usize)
            .ok_or_else(|| format!("no data file {index}"))?;
        let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut buf = Vec::with_capacity(len as usize);
        file.take(len as u64)
            .read_to_end(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(buf)
    }
}

/// The PEFT key of a plugin parameter (without `base_model.model.`).
pub fn key(module: &str, name: &str) -> String {
    if module.is_empty() {
        name.to_string()
    } else {
        format!("{module}.{name}")
    }
}
