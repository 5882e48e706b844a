//! The bottleneck adapter configuration, with AdapterHub's (`adapters` library) field names and
//! defaults, and clear errors for the AdapterHub features this plugin does not implement.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use whetstone_sdk::config::reject_switched_on;
use whetstone_sdk::targets::TargetSpec;
use whetstone_sdk::{ConfigField, Error, Result};

use crate::activation::NonLinearity;

/// The two adapter architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    /// Houlsby et al. 2019 (AdapterHub `"houlsby"` / `"double_seq_bn"`): after the attention
    /// output projection and after the feed-forward output projection, swish.
    Houlsby,
    /// Pfeiffer et al. 2021 (AdapterHub `"pfeiffer"` / `"seq_bn"`, its default): after the
    /// feed-forward output projection only, ReLU.
    #[default]
    Pfeiffer,
}

impl Variant {
    /// The variant AdapterHub calls `name`.
    pub fn from_name(name: &str) -> Option<Variant> {
        match name.to_lowercase().as_str() {
            "houlsby" | "double_seq_bn" => Some(Variant::Houlsby),
            "pfeiffer" | "seq_bn" => Some(Variant::Pfeiffer),
            _ => None,
        }
    }

    /// Whether it places an adapter after the attention output projection (`mh_adapter`).
    pub fn mh_adapter(self) -> bool {
        self == Variant::Houlsby
    }

    /// Its default non-linearity.
    pub fn non_linearity(self) -> NonLinearity {
        match self {
            Variant::Houlsby => NonLinearity::Swish,
            Variant::Pfeiffer => NonLinearity::Relu,
        }
    }
}

fn unknown_variant(field: &str, name: &str) -> String {
    format!(
        "{field} = \"{name}\" is not a bottleneck adapter this plugin provides (use \"houlsby\" / \
         \"double_seq_bn\" or \"pfeiffer\" / \"seq_bn\")"
    )
}

impl<'de> Deserialize<'de> for Variant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Variant::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(unknown_variant("config", &name)))
    }
}

/// AdapterHub's `init_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitWeights {
    /// `"mam_adapter"` (Whetstone's default): down-projection Kaiming-uniform (`nn.Linear`'s
    /// init), up-projection and biases zero, so the adapted model starts exactly as the base
    /// model.
    #[default]
    MamAdapter,
    /// `"bert"` (AdapterHub's default): both projections normal with std 0.02, biases zero; the
    /// adapter starts near, not at, the identity.
    Bert,
}

/// AdapterHub's `reduction_factor`: one number (a per-layer mapping is refused by name).
fn reduction_factor<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| serde::de::Error::custom("reduction_factor is not a number")),
        Value::Object(_) => Err(serde::de::Error::custom(
            "per-layer reduction_factor mappings are not supported; give one number",
        )),
        other => Err(serde::de::Error::custom(format!(
            "reduction_factor = {other} must be a number"
        ))),
    }
}

/// AdapterHub's `scaling`: a number (`"learned"` and `"channel"` are refused by name).
fn scaling<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| serde::de::Error::custom("scaling is not a number")),
        other => Err(serde::de::Error::custom(format!(
            "scaling = {other} is not supported (learned scalings are not implemented; give a number)"
        ))),
    }
}

fn default_reduction_factor() -> f64 {
    16.0
}

fn default_one() -> f64 {
    1.0
}

fn default_true() -> bool {
    true
}

/// The configuration, with AdapterHub's field names.
#[derive(Debug, Clone, Deserialize)]
pub struct BottleneckConfig {
    /// The architecture (`"houlsby"` | `"pfeiffer"`, or AdapterHub's `"double_seq_bn"` |
    /// `"seq_bn"`); default Pfeiffer, AdapterHub's default.
    #[serde(default)]
    pub config: Option<Variant>,
    /// Alias of `config`; AdapterHub's saved value `"bottleneck"` means "as `config` says".
    #[serde(default)]
    pub architecture: Option<String>,
    /// Overrides the architecture's adapter after the attention output projection.
    #[serde(default)]
    pub mh_adapter: Option<bool>,
    /// Overrides the architecture's adapter after the feed-forward output projection.
    #[serde(default)]
    pub output_adapter: Option<bool>,
    /// Bottleneck size = `floor(out_features / reduction_factor)` (at least 1).
    #[serde(
        default = "default_reduction_factor",
        deserialize_with = "reduction_factor"
    )]
    pub reduction_factor: f64,
    /// The non-linearity; default per architecture.
    #[serde(default)]
    pub non_linearity: Option<NonLinearity>,
    /// Whether the adapter's output is added to its input.
    #[serde(default = "default_true")]
    pub residual: bool,
    /// How the projections start.
    #[serde(default)]
    pub init_weights: InitWeights,
    /// Dropout on the adapter's output (before the residual), AdapterHub's `dropout`.
    #[serde(default)]
    pub dropout: f64,
    /// Factor on the adapter's output (He et al. 2021), AdapterHub's `scaling`.
    #[serde(default = "default_one", deserialize_with = "scaling")]
    pub scaling: f64,
    /// Blocks (0-based) that get no adapter.
    #[serde(default)]
    pub leave_out: Vec<usize>,
    /// Explicit modules to adapt (PEFT's rules), instead of the architecture's placement.
    #[serde(flatten)]
    pub targets: TargetSpec,
    /// Base modules trained whole and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field: bookkeeping is accepted, unsupported features are refused by name in
    /// [`BottleneckConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Settings of AdapterHub features that are off unless their switch is on (`phm_layer`,
/// `inv_adapter`), which AdapterHub writes with non-empty defaults: like the PEFT-style
/// bookkeeping the host writes, they carry no behaviour here.
const SWITCHED_SETTINGS: &[&str] = &[
    "inv_adapter_reduction_factor",
    "phm_dim",
    "factorized_phm_W",
    "shared_W_phm",
    "shared_phm_rule",
    "factorized_phm_rule",
    "phm_c_init",
    "phm_init_range",
    "learn_phm",
    "hypercomplex_nonlinearity",
    "phm_rank",
    "phm_bias",
];

/// AdapterHub fields whose default is on and is what this plugin does: the adapter reads the
/// sublayer's output, and the block's own residual and LayerNorm follow it.
const ON_AS_HERE: &[&str] = &["original_ln_after", "residual_before_ln"];

/// The reason each AdapterHub feature is refused when it is switched on.
const HINTS: &[(&str, &str)] = &[
    ("original_ln_before", READS_OUTPUT),
    ("original_ln_after", READS_OUTPUT),
    ("residual_before_ln", READS_OUTPUT),
    ("ln_before", NO_LAYER_NORMS),
    ("ln_after", NO_LAYER_NORMS),
    ("adapter_residual_before_ln", NO_LAYER_NORMS),
    ("is_parallel", " (parallel adapters are not implemented)"),
    ("phm_layer", " (Compacter's PHM layers are not implemented)"),
    ("inv_adapter", " (invertible adapters are not implemented)"),
    ("use_gating", " (gated adapters are not implemented)"),
    (
        "cross_adapter",
        " (encoder-decoder models are not supported)",
    ),
    ("stochastic_depth", " (stochastic depth is not implemented)"),
];

const READS_OUTPUT: &str = " (the adapter reads the output projection's result, before the \
                            block's own residual and LayerNorm)";
const NO_LAYER_NORMS: &str = " (adapter LayerNorms are not implemented)";

impl BottleneckConfig {
    /// The architecture, from `config` and `architecture`.
    pub fn variant(&self) -> Result<Variant> {
        let from_architecture = match self.architecture.as_deref() {
            None => None,
            Some(a) if a.eq_ignore_ascii_case("bottleneck") => None,
            Some(a) => Some(
                Variant::from_name(a)
                    .ok_or_else(|| Error::config(unknown_variant("architecture", a)))?,
            ),
        };
        match (self.config, from_architecture) {
            (Some(c), Some(a)) if c != a => Err(Error::config(format!(
                "config ({c:?}) and architecture ({a:?}) name different adapters"
            ))),
            (c, a) => Ok(c.or(a).unwrap_or_default()),
        }
    }

    /// Whether adapters go after the attention and after the feed-forward output projection.
    pub fn placements(&self) -> Result<(bool, bool)> {
        let variant = self.variant()?;
        Ok((
            self.mh_adapter.unwrap_or(variant.mh_adapter()),
            self.output_adapter.unwrap_or(true),
        ))
    }

    /// The non-linearity (the architecture's default unless given).
    pub fn activation(&self) -> Result<NonLinearity> {
        Ok(self
            .non_linearity
            .unwrap_or(self.variant()?.non_linearity()))
    }

    /// The bottleneck width of an adapter on a module with `features` outputs.
    pub fn bottleneck(&self, features: usize) -> usize {
        ((features as f64 / self.reduction_factor).floor() as usize).max(1)
    }

    /// Refuses values the plugin cannot honour, naming the field.
    pub fn validate(&self) -> Result<()> {
        let (attention, ffn) = self.placements()?;
        if !attention && !ffn && self.targets.target_modules.is_none() {
            return Err(Error::config(
                "mh_adapter and output_adapter are both false: no adapter would be placed",
            ));
        }
        if !(self.reduction_factor.is_finite() && self.reduction_factor > 0.0) {
            return Err(Error::config(format!(
                "reduction_factor = {} must be a positive number",
                self.reduction_factor
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(format!(
                "dropout = {} must be in [0, 1)",
                self.dropout
            )));
        }
        if !self.scaling.is_finite() {
            return Err(Error::config(format!(
                "scaling = {} must be a finite number",
                self.scaling
            )));
        }
        // The fields whose on value is what this plugin does pass here; the rest are refused
        // while switched on.
        let other: BTreeMap<String, Value> = self
            .other
            .iter()
            .filter(|(field, value)| {
                !(ON_AS_HERE.contains(&field.as_str()) && **value == Value::Bool(true))
            })
            .map(|(field, value)| (field.clone(), value.clone()))
            .collect();
        reject_switched_on("bottleneck adapter", &other, SWITCHED_SETTINGS, HINTS)
    }
}

/// The documented fields.
pub fn fields() -> Vec<ConfigField> {
    vec![
        ConfigField::new(
            "config",
            "\"houlsby\" | \"pfeiffer\" (or \"double_seq_bn\" | \"seq_bn\")",
            "\"pfeiffer\"",
            "houlsby: adapters after the attention and the feed-forward output projections; \
             pfeiffer: after the feed-forward output projection only",
        ),
        ConfigField::new(
            "architecture",
            "as config, or \"bottleneck\"",
            "null",
            "alias of config (AdapterHub writes \"bottleneck\")",
        ),
        ConfigField::new(
            "mh_adapter",
            "bool",
            "per config (houlsby true, pfeiffer false)",
            "adapter after the attention output projection",
        ),
        ConfigField::new(
            "output_adapter",
            "bool",
            "true",
            "adapter after the feed-forward output projection",
        ),
        ConfigField::new(
            "reduction_factor",
            "float",
            "16",
            "bottleneck = floor(out_features / reduction_factor), at least 1",
        ),
        ConfigField::new(
            "non_linearity",
            "\"relu\" | \"swish\" | \"silu\" | \"gelu\" | \"gelu_new\" | \"tanh\" | \"sigmoid\" \
             | \"linear\"",
            "per config (houlsby swish, pfeiffer relu)",
            "activation inside the bottleneck",
        ),
        ConfigField::new(
            "residual",
            "bool",
            "true",
            "add the adapter's output to its input",
        ),
        ConfigField::new(
            "init_weights",
            "\"mam_adapter\" | \"bert\"",
            "\"mam_adapter\"",
            "mam_adapter: down Kaiming-uniform, up and biases zero (starts at the base model); \
             bert: both N(0, 0.02), biases zero (AdapterHub's default)",
        ),
        ConfigField::new("dropout", "float", "0.0", "dropout on the adapter's output"),
        ConfigField::new("scaling", "float", "1.0", "factor on the adapter's output"),
        ConfigField::new(
            "leave_out",
            "list of ints",
            "[]",
            "blocks that get no adapter",
        ),
        ConfigField::new(
            "target_modules",
            "list of names, regex string or \"all-linear\"",
            "null (placement per config)",
            "explicit modules whose output is adapted, instead of config's placement",
        ),
        ConfigField::new(
            "exclude_modules",
            "list of names or regex string",
            "null",
            "modules never adapted",
        ),
        ConfigField::new(
            "modules_to_save",
            "list of names",
            "null (classification heads for sequence classification)",
            "base modules trained whole and saved",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> BottleneckConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_follow_adapterhub() {
        let p = parse("{}");
        p.validate().unwrap();
        assert_eq!(p.variant().unwrap(), Variant::Pfeiffer);
        assert_eq!(p.placements().unwrap(), (false, true));
        assert_eq!(p.activation().unwrap(), NonLinearity::Relu);
        assert_eq!((p.reduction_factor, p.scaling, p.dropout), (16.0, 1.0, 0.0));
        assert!(p.residual);
        assert_eq!(p.init_weights, InitWeights::MamAdapter);
        assert_eq!((p.bottleneck(384), p.bottleneck(8)), (24, 1));

        let h = parse(r#"{"config": "double_seq_bn", "reduction_factor": 8}"#);
        h.validate().unwrap();
        assert_eq!(h.placements().unwrap(), (true, true));
        assert_eq!(h.activation().unwrap(), NonLinearity::Swish);
        assert_eq!(h.bottleneck(32), 4);

        let a = parse(r#"{"architecture": "houlsby", "non_linearity": "gelu"}"#);
        assert_eq!(a.variant().unwrap(), Variant::Houlsby);
        assert_eq!(a.activation().unwrap(), NonLinearity::Gelu);
        let b = parse(r#"{"architecture": "bottleneck", "mh_adapter": true}"#);
        assert_eq!(b.placements().unwrap(), (true, true));
    }

    #[test]
    fn conflicting_or_unknown_architectures_are_refused() {
        let both = parse(r#"{"config": "pfeiffer", "architecture": "houlsby"}"#);
        assert!(both.validate().is_err());
        let lora = parse(r#"{"architecture": "lora"}"#);
        let err = lora.validate().unwrap_err().to_string();
        assert!(
            err.contains("architecture") && err.contains("lora"),
            "{err}"
        );
        let bad = serde_json::from_str::<BottleneckConfig>(r#"{"config": "par_bn"}"#);
        assert!(bad.unwrap_err().to_string().contains("par_bn"));
        let none = parse(r#"{"output_adapter": false}"#);
        assert!(none.validate().is_err());
    }

    #[test]
    fn adapterhub_fields_are_accepted_when_they_match_and_named_otherwise() {
        let ok = parse(
            r#"{"config": "pfeiffer", "original_ln_after": true, "residual_before_ln": true,
                "ln_before": false, "is_parallel": false, "stochastic_depth": 0.0,
                "phm_dim": 4, "phm_c_init": "normal", "inv_adapter": null,
                "peft_type": "BOTTLENECK", "task_type": "SEQ_CLS"}"#,
        );
        ok.validate().unwrap();
        for (json, name) in [
            (r#"{"original_ln_before": true}"#, "original_ln_before"),
            (r#"{"is_parallel": true}"#, "is_parallel"),
            (r#"{"ln_after": true}"#, "ln_after"),
            (r#"{"phm_layer": true}"#, "Compacter"),
        ] {
            let err = parse(json).validate().unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
        let learned = serde_json::from_str::<BottleneckConfig>(r#"{"scaling": "learned"}"#);
        assert!(learned.unwrap_err().to_string().contains("learned"));
        let mapping =
            serde_json::from_str::<BottleneckConfig>(r#"{"reduction_factor": {"default": 16}}"#);
        assert!(mapping.unwrap_err().to_string().contains("per-layer"));
        let houlsby_init =
            serde_json::from_str::<BottleneckConfig>(r#"{"init_weights": "houlsby"}"#);
        assert!(houlsby_init.is_err());
        assert!(parse(r#"{"reduction_factor": 0}"#).validate().is_err());
    }
}
