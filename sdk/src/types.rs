//! The plain data types of the contract, shared by the SDK, both transports and the host.

use serde::{Deserialize, Serialize};

macro_rules! ops {
    ($($(#[$doc:meta])* $variant:ident = $code:literal, $wit:literal;)*) => {
        /// A tensor operation the host performs for a plugin (WIT `types.op`, C `WsOp`).
        ///
        /// Arguments travel as `inputs` (tensor handles), `ints` and `floats`. Dimensions may be
        /// negative, counted from the end (`-1` is the last). Binary ops broadcast.
        #[repr(u32)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Op {
            $($(#[$doc])* $variant = $code,)*
        }

        impl Op {
            /// Every op, in code order.
            pub const ALL: &'static [Op] = &[$(Op::$variant,)*];

            /// The op with C code `code`.
            pub fn from_code(code: u32) -> Option<Op> {
                match code {
                    $($code => Some(Op::$variant),)*
                    _ => None,
                }
            }

            /// The op's WIT name (`matmul-t`, `log-softmax`, ...), used in error messages.
            pub fn name(self) -> &'static str {
                match self {
                    $(Op::$variant => $wit,)*
                }
            }
        }
    };
}

ops! {
    /// `a · b` (batched, broadcasting). inputs `[a, b]`.
    Matmul = 0, "matmul";
    /// `a · bᵀ` over the last two dims of `b`. inputs `[a, b]`.
    MatmulT = 1, "matmul-t";
    /// `a + b`. inputs `[a, b]`.
    Add = 2, "add";
    /// `a - b`. inputs `[a, b]`.
    Sub = 3, "sub";
    /// `a * b` elementwise. inputs `[a, b]`.
    Mul = 4, "mul";
    /// `a / b` elementwise. inputs `[a, b]`.
    Div = 5, "div";
    /// Elementwise maximum. inputs `[a, b]`.
    Maximum = 6, "maximum";
    /// Elementwise minimum. inputs `[a, b]`.
    Minimum = 7, "minimum";
    /// `a * s`. inputs `[a]`, floats `[s]`.
    Scale = 8, "scale";
    /// `a + c`. inputs `[a]`, floats `[c]`.
    AddScalar = 9, "add-scalar";
    /// `a ^ e`. inputs `[a]`, floats `[e]`.
    Powf = 10, "powf";
    /// Clamp into `[lo, hi]`. inputs `[a]`, floats `[lo, hi]`.
    Clamp = 11, "clamp";
    /// `-a`. inputs `[a]`.
    Neg = 12, "neg";
    /// `exp(a)`. inputs `[a]`.
    Exp = 13, "exp";
    /// `ln(a)`. inputs `[a]`.
    Log = 14, "log";
    /// `sqrt(a)`. inputs `[a]`.
    Sqrt = 15, "sqrt";
    /// `a²`. inputs `[a]`.
    Sqr = 16, "sqr";
    /// `|a|`. inputs `[a]`.
    Abs = 17, "abs";
    /// `1 / a`. inputs `[a]`.
    Recip = 18, "recip";
    /// SiLU. inputs `[a]`.
    Silu = 19, "silu";
    /// Exact (erf) GELU. inputs `[a]`.
    Gelu = 20, "gelu";
    /// tanh-approximated GELU. inputs `[a]`.
    GeluTanh = 21, "gelu-tanh";
    /// ReLU. inputs `[a]`.
    Relu = 22, "relu";
    /// tanh. inputs `[a]`.
    Tanh = 23, "tanh";
    /// Logistic sigmoid. inputs `[a]`.
    Sigmoid = 24, "sigmoid";
    /// Softmax over a dim. inputs `[a]`, ints `[dim]`.
    Softmax = 25, "softmax";
    /// Log-softmax over a dim. inputs `[a]`, ints `[dim]`.
    LogSoftmax = 26, "log-softmax";
    /// Sum over dims. inputs `[a]`, ints `[keepdim (0|1), dims...]`.
    Sum = 27, "sum";
    /// Mean over dims. inputs `[a]`, ints `[keepdim (0|1), dims...]`.
    Mean = 28, "mean";
    /// Maximum over one dim. inputs `[a]`, ints `[keepdim (0|1), dim]`.
    Max = 29, "max";
    /// Minimum over one dim. inputs `[a]`, ints `[keepdim (0|1), dim]`.
    Min = 30, "min";
    /// L2 norm over dims. inputs `[a]`, ints `[keepdim (0|1), dims...]`.
    Norm = 31, "norm";
    /// New shape (one entry may be -1). inputs `[a]`, ints `shape`.
    Reshape = 32, "reshape";
    /// Swap two dims. inputs `[a]`, ints `[d0, d1]`.
    Transpose = 33, "transpose";
    /// A slice along a dim. inputs `[a]`, ints `[dim, start, len]`.
    Narrow = 34, "narrow";
    /// Concatenation along a dim. inputs `[a, b, ...]`, ints `[dim]`.
    Cat = 35, "cat";
    /// Rows of `a` picked by integer `indices` along a dim. inputs `[a, indices]`, ints `[dim]`.
    IndexSelect = 36, "index-select";
    /// `cond ? on_true : on_false` (cond u8/u32, non-zero is true). inputs `[cond, on_true, on_false]`.
    WhereCond = 37, "where-cond";
    /// Removes a dim of size 1. inputs `[a]`, ints `[dim]`.
    Squeeze = 38, "squeeze";
    /// Inserts a dim of size 1. inputs `[a]`, ints `[dim]`.
    Unsqueeze = 39, "unsqueeze";
    /// Broadcasts to a shape. inputs `[a]`, ints `shape`.
    BroadcastAs = 40, "broadcast-as";
    /// A contiguous copy when needed. inputs `[a]`.
    Contiguous = 41, "contiguous";
    /// Converts the element type. inputs `[a]`, ints `[dtype code]` (see [`DType`]).
    ToDtype = 42, "to-dtype";
    /// Zeros shaped like `a`. inputs `[a]`.
    ZerosLike = 43, "zeros-like";
    /// Ones shaped like `a`. inputs `[a]`.
    OnesLike = 44, "ones-like";
    /// Normal samples shaped like `a` from the host's seeded generator. inputs `[a]`, floats `[mean, std]`.
    RandnLike = 45, "randn-like";
    /// f32 zeros on the model's device. ints `shape`.
    Zeros = 46, "zeros";
    /// f32 ones on the model's device. ints `shape`.
    Ones = 47, "ones";
    /// f32 filled with a value. ints `shape`, floats `[value]`.
    Full = 48, "full";
    /// The same tensor under a new handle (still differentiable). inputs `[a]`.
    Identity = 49, "identity";
    /// The value without its autograd history. inputs `[a]`.
    Detach = 50, "detach";
    /// Inverted dropout with probability `p` in training mode; identity in evaluation mode.
    /// Masks come from the host's generator, seeded per step. inputs `[a]`, floats `[p]`.
    Dropout = 51, "dropout";
    /// Entries of `a` picked per position by integer `indices` of the same rank along a dim
    /// (PyTorch's `gather`; a loss picks each label's log-probability with it).
    /// inputs `[a, indices]`, ints `[dim]`.
    Gather = 52, "gather";
}

/// Element types (WIT `types.dtype`, C `WsDType`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float.
    F32 = 0,
    /// 16-bit float.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
    /// 64-bit float.
    F64 = 3,
    /// Unsigned byte.
    U8 = 4,
    /// Unsigned 32-bit integer.
    U32 = 5,
    /// Signed 64-bit integer.
    I64 = 6,
}

impl DType {
    /// The dtype with C code `code`.
    pub fn from_code(code: u32) -> Option<DType> {
        [
            DType::F32,
            DType::F16,
            DType::Bf16,
            DType::F64,
            DType::U8,
            DType::U32,
            DType::I64,
        ]
        .into_iter()
        .find(|d| *d as u32 == code)
    }
}

/// How a new parameter is initialised (WIT `types.init`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Every element set to a value.
    Constant(f64),
    /// Normal samples.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
    /// Uniform samples in `[low, high)`.
    Uniform {
        /// Lower bound.
        low: f64,
        /// Upper bound.
        high: f64,
    },
    /// PyTorch's `kaiming_uniform_(w, a)`: uniform in `±gain·sqrt(3 / fan_in)` with
    /// `gain = sqrt(2 / (1 + a²))`; `a = sqrt(5)` is `nn.Linear`'s default (bound `1/sqrt(fan_in)`).
    KaimingUniform {
        /// Negative slope `a`.
        a: f64,
    },
    /// A detached copy of a tensor's value (the handle's raw id).
    FromTensor(u64),
}

impl Init {
    /// `nn.Linear`'s default weight init, `kaiming_uniform_(w, a = sqrt(5))`.
    pub fn kaiming_uniform() -> Init {
        Init::KaimingUniform { a: 5f64.sqrt() }
    }
}

/// Training or evaluation (WIT `types.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Training: dropout active.
    Train,
    /// Evaluation or inference.
    Eval,
}

/// A linear module of the base model (WIT `types.linear-info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearInfo {
    /// Hugging Face module name, e.g. `model.layers.3.self_attn.q_proj`.
    pub name: String,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Whether the base module has a bias.
    pub has_bias: bool,
    /// The transformer block index, when the module sits in one.
    pub layer_index: Option<usize>,
}

/// The base model's shape (WIT `types.model-info`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `config.json` architecture, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// `causal-lm` or `sequence-classification`.
    pub task: String,
    /// Hidden size.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

/// A point in the training run (WIT `types.event`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// Before the first step.
    TrainStart,
    /// After an optimizer step (1-based) with its loss.
    StepEnd {
        /// The step just taken.
        step: u64,
        /// Its mean loss.
        loss: f64,
    },
    /// After an epoch (1-based).
    EpochEnd(u32),
    /// After the last step.
    TrainEnd,
    /// A continual-learning run starts task `index` (0-based) of its task sequence.
    TaskStart(u32),
    /// After task `task` trained, the host ran forward and backward (data loss only) on its
    /// training example number `example`; [`crate::host::grad`] reads the gradients now.
    TaskGradient {
        /// The task that just finished training.
        task: u32,
        /// 0-based, below [`crate::PeftMethod::task_gradient_examples`].
        example: u32,
    },
    /// Task `index` is finished (after its gradient pass).
    TaskEnd(u32),
}

/// What kind of component a plugin provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// A PEFT method ([`crate::PeftMethod`]).
    Method,
    /// A loss function ([`crate::Loss`]).
    Loss,
    /// A data loader ([`crate::DataLoader`]).
    DataLoader,
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PluginKind::Method => "method",
            PluginKind::Loss => "loss",
            PluginKind::DataLoader => "data-loader",
        })
    }
}

/// One documented configuration field of a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigField {
    /// Field name as written in the recipe / `adapter_config.json`.
    pub name: String,
    /// Type in words (`int`, `float`, `list of strings or regex string`, ...).
    #[serde(rename = "type")]
    pub ty: String,
    /// Default as written in JSON, or empty when the field is required.
    pub default: String,
    /// What the field does.
    pub doc: String,
}

/// What a plugin says about itself (the `metadata` export, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Plugin name (the crate name unless overridden).
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// One line about the plugin.
    #[serde(default)]
    pub description: String,
    /// What it provides.
    pub kinds: Vec<PluginKind>,
    /// The SDK version it was built with.
    pub sdk_version: String,
    /// The contract version it speaks (`major.minor`).
    pub contract: String,
    /// Its configuration fields.
    #[serde(default)]
    pub config_fields: Vec<ConfigField>,
}
