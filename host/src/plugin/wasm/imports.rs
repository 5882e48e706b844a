//! The store's data and the `host` interface a WebAssembly plugin imports. Every import
//! delegates to [`HostState`], exactly as the native transport's host table does, so both
//! transports give a plugin the same answers.

use std::panic::{catch_unwind, AssertUnwindSafe};

use wasmtime::ResourceLimiter;
use whetstone_sdk::{DType, Init, Op};

use super::bindings::whetstone::plugin::{host, types};
use crate::plugin::session::HostState;

/// Caps a store's linear memory; growing past the cap traps with a message naming it.
#[derive(Debug)]
pub struct MemoryCap {
    /// The cap in bytes.
    pub bytes: usize,
    /// The size a refused growth asked for, since the start of the current call.
    pub refused: Option<usize>,
}

/// Most table elements a plugin may have (function tables of ordinary Rust code are tiny).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.bytes {
            self.refused = Some(desired);
            return Err(wasmtime::format_err!(
                "linear memory would grow to {} MiB, past the cap of {} MiB",
                desired.div_ceil(1 << 20),
                self.bytes >> 20
            ));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// What a plugin's store holds: its handle table and session, and its memory cap.
#[derive(Debug)]
pub struct StoreData {
    /// Handles and session, shared logic with the native transport.
    pub state: HostState,
    /// The memory cap.
    pub cap: MemoryCap,
    /// The last error-level line the plugin logged during the current call (a panicking
    /// plugin logs its panic message before it traps).
    pub last_error_log: Option<String>,
}

impl StoreData {
    /// Fresh data with a memory cap of `memory_mb` MiB.
    pub fn new(memory_mb: u64) -> StoreData {
        let bytes = usize::try_from(memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        StoreData {
            state: HostState::default(),
            cap: MemoryCap {
                bytes,
                refused: None,
            },
            last_error_log: None,
        }
    }

    /// Forgets every handle (after a trap the plugin can release none of them), keeping the
    /// session.
    pub fn drop_handles(&mut self) {
        let session = self.state.session().ok().cloned();
        self.state = HostState::default();
        self.state.set_session(session);
    }
}

/// Runs an import body; a panic inside the host becomes an error the plugin receives.
fn host_call<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err("the host panicked while serving this call".to_string()))
}

/// The SDK op of a WIT op: the contract numbers ops in the WIT enum's order.
pub fn op_from_wit(op: types::Op) -> Result<Op, String> {
    let code = op as u32;
    Op::from_code(code).ok_or_else(|| format!("unknown op code {code}"))
}

fn dtype_to_wit(d: DType) -> types::Dtype {
    match d {
        DType::F32 => types::Dtype::F32,
        DType::F16 => types::Dtype::F16,
        DType::Bf16 => types::Dtype::Bf16,
        DType::F64 => types::Dtype::F64,
        DType::U8 => types::Dtype::U8,
        DType::U32 => types::Dtype::U32,
        DType::I64 => types::Dtype::I64,
    }
}

fn init_from_wit(init: types::Init) -> Init {
    match init {
        types::Init::Zeros => Init::Zeros,
        types::Init::Ones => Init::Ones,
        types::Init::Constant(v) => Init::Constant(v),
        types::Init::Normal((mean, std)) => Init::Normal { mean, std },
        types::Init::Uniform((low, high)) => Init::Uniform { low, high },
        types::Init::KaimingUniform(a) => Init::KaimingUniform { a },
        types::Init::FromTensor(t) => Init::FromTensor(t),
    }
}

impl types::Host for StoreData {}

impl host::Host for StoreData {
    fn tensor_op(
        &mut self,
        op: types::Op,
        inputs: Vec<u64>,
        ints: Vec<i64>,
        floats: Vec<f64>,
    ) -> Result<u64, String> {
        host_call(|| {
            self.state
                .tensor_op(op_from_wit(op)?, &inputs, &ints, &floats)
        })
    }

    fn shape(&mut self, t: u64) -> Result<Vec<u64>, String> {
        host_call(|| self.state.shape(t))
    }

    fn dtype(&mut self, t: u64) -> Result<types::Dtype, String> {
        host_call(|| self.state.dtype(t).map(dtype_to_wit))
    }

    fn to_vec(&mut self, t: u64) -> Result<Vec<f32>, String> {
        host_call(|| self.state.to_vec(t))
    }

    fn from_vec(&mut self, data: Vec<f32>, shape: Vec<u64>) -> Result<u64, String> {
        host_call(|| self.state.from_vec(&data, &shape))
    }

    fn release(&mut self, t: u64) {
        self.state.release(t);
    }

    fn add_param(
        &mut self,
        module: String,
        name: String,
        shape: Vec<u64>,
        init: types::Init,
    ) -> Result<u64, String> {
        host_call(|| {
            self.state
                .add_param(&module, &name, &shape, init_from_wit(init))
        })
    }

    fn param(&mut self, module: String, name: String) -> Result<u64, String> {
        host_call(|| self.state.param(&module, &name))
    }

    fn base_param(&mut self, name: String) -> Result<u64, String> {
        host_call(|| self.state.base_param(&name))
    }

    fn grad(&mut self, t: u64) -> Result<Option<u64>, String> {
        host_call(|| self.state.grad(t))
    }

    fn mode(&mut self) -> types::Mode {
        match self.state.session() {
            Ok(s) if s.ctx.mode() == crate::model::Mode::Train => types::Mode::Train,
            _ => types::Mode::Eval,
        }
    }

    fn step(&mut self) -> u64 {
        self.state.session().map(|s| s.ctx.step()).unwrap_or(0)
    }

    fn log(&mut self, level: u8, message: String) {
        super::super::log_from_plugin(u32::from(level), &message);
        if level == 0 {
            self.last_error_log = Some(message);
        }
    }

    fn file_count(&mut self) -> u32 {
        self.state
            .session()
            .map(|s| s.files.len() as u32)
            .unwrap_or(0)
    }

    fn file_name(&mut self, index: u32) -> Result<String, String> {
        host_call(|| self.state.file_name(index))
    }

    fn read_file(&mut self, index: u32, offset: u64, len: u32) -> Result<Vec<u8>, String> {
        host_call(|| self.state.read_file(index, offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wit_ops_map_to_sdk_ops_by_position() {
        assert_eq!(op_from_wit(types::Op::Matmul), Ok(Op::Matmul));
        assert_eq!(op_from_wit(types::Op::MatmulT), Ok(Op::MatmulT));
        assert_eq!(op_from_wit(types::Op::LogSoftmax), Ok(Op::LogSoftmax));
        assert_eq!(op_from_wit(types::Op::WhereCond), Ok(Op::WhereCond));
        assert_eq!(op_from_wit(types::Op::Dropout), Ok(Op::Dropout));
        assert_eq!(op_from_wit(types::Op::Gather), Ok(Op::Gather));
        assert_eq!(Op::ALL.len(), types::Op::Gather as usize + 1);
    }

    #[test]
    fn growth_past_the_cap_is_refused_with_a_message() {
        let mut data = StoreData::new(1);
        assert!(matches!(
            data.cap.memory_growing(0, 1 << 20, None),
            Ok(true)
        ));
        let err = data.cap.memory_growing(0, (1 << 20) + 1, None).unwrap_err();
        assert!(err.to_string().contains("cap of 1 MiB"), "{err}");
        assert_eq!(data.cap.refused, Some((1 << 20) + 1));
    }
}
