//! The bottleneck's non-linearity, by the names AdapterHub passes to transformers'
//! `get_activation` (lower-cased, as AdapterHub does).

use serde::{Deserialize, Deserializer};
use whetstone_sdk::{Result, Tensor};

/// AdapterHub's `non_linearity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonLinearity {
    /// `"relu"` (Pfeiffer's default).
    Relu,
    /// `"swish"` or `"silu"`: `x · sigmoid(x)` (Houlsby's default).
    Swish,
    /// `"gelu"`: exact (erf) GELU.
    Gelu,
    /// `"gelu_new"`, `"gelu_pytorch_tanh"` or `"gelu_fast"`: tanh-approximated GELU.
    GeluTanh,
    /// `"tanh"`.
    Tanh,
    /// `"sigmoid"`.
    Sigmoid,
    /// `"linear"`: no non-linearity.
    Linear,
}

impl NonLinearity {
    /// The activation called `name` (case-insensitive).
    pub fn from_name(name: &str) -> Option<NonLinearity> {
        Some(match name.to_lowercase().as_str() {
            "relu" => NonLinearity::Relu,
            "swish" | "silu" => NonLinearity::Swish,
            "gelu" => NonLinearity::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => NonLinearity::GeluTanh,
            "tanh" => NonLinearity::Tanh,
            "sigmoid" => NonLinearity::Sigmoid,
            "linear" => NonLinearity::Linear,
            _ => return None,
        })
    }

    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            NonLinearity::Relu => x.relu(),
            NonLinearity::Swish => x.silu(),
            NonLinearity::Gelu => x.gelu(),
            NonLinearity::GeluTanh => x.gelu_tanh(),
            NonLinearity::Tanh => x.tanh(),
            NonLinearity::Sigmoid => x.sigmoid(),
            NonLinearity::Linear => Ok(x.clone()),
        }
    }
}

impl<'de> Deserialize<'de> for NonLinearity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        NonLinearity::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "non_linearity = \"{name}\" is not supported (use \"relu\", \"swish\", \"silu\", \
                 \"gelu\", \"gelu_new\", \"tanh\", \"sigmoid\" or \"linear\")"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_transformers_and_ignore_case() {
        assert_eq!(NonLinearity::from_name("ReLU"), Some(NonLinearity::Relu));
        assert_eq!(NonLinearity::from_name("silu"), Some(NonLinearity::Swish));
        assert_eq!(NonLinearity::from_name("swish"), Some(NonLinearity::Swish));
        assert_eq!(
            NonLinearity::from_name("gelu_new"),
            Some(NonLinearity::GeluTanh)
        );
        assert_eq!(NonLinearity::from_name("leakyrelu"), None);
        let err = serde_json::from_str::<NonLinearity>(r#""mish""#).unwrap_err();
        assert!(err.to_string().contains("mish"), "{err}");
    }
}
