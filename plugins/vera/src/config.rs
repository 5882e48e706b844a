//! PEFT's `VeraConfig`: the fields VeRA reads, their defaults, and clear errors for the PEFT
//! fields this plugin does not implement.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use whetstone_sdk::config::reject_switched_on;
use whetstone_sdk::targets::TargetSpec;
use whetstone_sdk::{ConfigField, Error, Result};

/// PEFT's `bias` field for VeRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    /// No bias trains.
    #[default]
    None,
    /// Every bias of the model trains.
    All,
    /// The biases of the wrapped modules train.
    VeraOnly,
}

fn default_r() -> usize {
    256
}

fn default_d_initial() -> f64 {
    0.1
}

fn default_true() -> bool {
    true
}

/// `projection_prng_key` as a 64-bit seed: PEFT passes it to `torch.Generator.manual_seed`,
/// which takes any integer in `[-2⁶³, 2⁶⁴)`; a negative key is read as its two's complement,
/// as torch does.
fn prng_key<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    let v = Value::deserialize(d)?;
    v.as_u64()
        .or_else(|| v.as_i64().map(|i| i as u64))
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "projection_prng_key = {v} must be an integer in [-2^63, 2^64)"
            ))
        })
}

/// The configuration, with PEFT's field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct VeraConfig {
    /// Rank of the shared projections (PEFT's default 256: VeRA's ranks are far higher than
    /// LoRA's because only the vectors train).
    #[serde(default = "default_r")]
    pub r: usize,
    /// Which modules to wrap.
    #[serde(flatten)]
    pub targets: TargetSpec,
    /// Seed of the shared random projections `vera_A` / `vera_B`.
    #[serde(default, deserialize_with = "prng_key")]
    pub projection_prng_key: u64,
    /// PEFT's switch for storing the projections in the adapter file. Whetstone never stores
    /// them (see the crate documentation); either value is accepted.
    #[serde(default = "default_true")]
    pub save_projection: bool,
    /// Dropout on the VeRA branch's input.
    #[serde(default)]
    pub vera_dropout: f64,
    /// Initial value of every entry of `vera_lambda_d`.
    #[serde(default = "default_d_initial")]
    pub d_initial: f64,
    /// `true` (PEFT's default): `vera_lambda_b` zero and `vera_lambda_d` = `d_initial`, so
    /// training starts from the base model; `false`: PEFT's raw init (`λ_b` ones, `λ_d`
    /// standard normal), for tests.
    #[serde(default = "default_true")]
    pub init_weights: bool,
    /// Which biases train.
    #[serde(default)]
    pub bias: Bias,
    /// Base modules trained whole and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field: PEFT bookkeeping is accepted, unsupported features are refused by
    /// name in [`VeraConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl VeraConfig {
    /// Refuses values VeRA cannot honour, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("r must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.vera_dropout) {
            return Err(Error::config(format!(
                "vera_dropout = {} must be in [0, 1)",
                self.vera_dropout
            )));
        }
        if !self.d_initial.is_finite() {
            return Err(Error::config(format!(
                "d_initial = {} must be a finite number",
                self.d_initial
            )));
        }
        reject_switched_on(
            "VeRA",
            &self.other,
            &[],
            &[(
                "fan_in_fan_out",
                " (GPT-2 Conv1D weights are not supported)",
            )],
        )
    }
}

/// The documented fields.
pub fn fields() -> Vec<ConfigField> {
    vec![
        ConfigField::new(
            "r",
            "int",
            "256",
            "rank of the shared random projections vera_A [r, max_in] and vera_B [max_out, r]",
        ),
        ConfigField::new(
            "target_modules",
            "list of names, regex string or \"all-linear\"",
            "per model type (q/v projections)",
            "modules to wrap",
        ),
        ConfigField::new(
            "exclude_modules",
            "list of names or regex string",
            "null",
            "modules never wrapped",
        ),
        ConfigField::new(
            "layers_to_transform",
            "int or list of ints",
            "null",
            "only wrap modules in these blocks",
        ),
        ConfigField::new(
            "layers_pattern",
            "string or list",
            "null",
            "the block container name (layers, layer, h)",
        ),
        ConfigField::new(
            "projection_prng_key",
            "int",
            "0",
            "seed of vera_A / vera_B (Whetstone's own generator, not torch's)",
        ),
        ConfigField::new(
            "save_projection",
            "bool",
            "true",
            "accepted for PEFT compatibility; Whetstone never stores the projections, it \
             regenerates them from projection_prng_key",
        ),
        ConfigField::new(
            "vera_dropout",
            "float",
            "0.0",
            "dropout on the VeRA branch's input",
        ),
        ConfigField::new(
            "d_initial",
            "float",
            "0.1",
            "initial value of vera_lambda_d",
        ),
        ConfigField::new(
            "init_weights",
            "bool",
            "true",
            "true: vera_lambda_b zero, vera_lambda_d = d_initial; false: ones and N(0, 1)",
        ),
        ConfigField::new(
            "fan_in_fan_out",
            "bool",
            "false",
            "true (GPT-2 Conv1D weights) is refused",
        ),
        ConfigField::new(
            "bias",
            "\"none\" | \"all\" | \"vera_only\"",
            "\"none\"",
            "which biases train",
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

    fn parse(json: &str) -> VeraConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_follow_peft() {
        let c = parse("{}");
        c.validate().unwrap();
        assert_eq!(c.r, 256);
        assert_eq!(c.projection_prng_key, 0);
        assert!(c.save_projection && c.init_weights);
        assert_eq!(
            (c.vera_dropout, c.d_initial, c.bias),
            (0.0, 0.1, Bias::None)
        );
        let t = parse(r#"{"r": 8, "target_modules": ["q_proj", "v_proj"], "bias": "vera_only"}"#);
        t.validate().unwrap();
        assert_eq!((t.r, t.bias), (8, Bias::VeraOnly));
        assert!(t.targets.target_modules.is_some());
    }

    #[test]
    fn prng_keys_take_any_torch_seed() {
        assert_eq!(
            parse(r#"{"projection_prng_key": 7}"#).projection_prng_key,
            7
        );
        assert_eq!(
            parse(r#"{"projection_prng_key": -1}"#).projection_prng_key,
            u64::MAX
        );
        let bad: std::result::Result<VeraConfig, _> =
            serde_json::from_str(r#"{"projection_prng_key": 1.5}"#);
        assert!(bad.unwrap_err().to_string().contains("projection_prng_key"));
    }

    #[test]
    fn peft_bookkeeping_is_accepted_and_unsupported_features_named() {
        let ok = parse(
            r#"{"peft_type": "VERA", "task_type": "SEQ_CLS", "peft_version": "0.21.2",
                "fan_in_fan_out": false, "save_projection": false, "inference_mode": true}"#,
        );
        ok.validate().unwrap();
        let conv = parse(r#"{"fan_in_fan_out": true}"#);
        let err = conv.validate().unwrap_err().to_string();
        assert!(
            err.contains("fan_in_fan_out") && err.contains("Conv1D"),
            "{err}"
        );
        let other = parse(r#"{"use_dora": true}"#).validate().unwrap_err();
        assert!(other.to_string().contains("use_dora"), "{other}");
        assert!(parse(r#"{"r": 0}"#).validate().is_err());
        assert!(parse(r#"{"vera_dropout": 1.0}"#).validate().is_err());
    }
}
