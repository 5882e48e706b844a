//! Focal loss as a Whetstone loss plugin.
//!
//! Lin, Goyal, Girshick, He and Dollár 2017, "Focal Loss for Dense Object Detection". With the
//! probability of the true class `p_t = softmax(z)_y`, the focusing parameter `γ` and the class
//! weight `α_t`, the loss of a batch is the mean over the positions the mask keeps of
//!
//! `FL(p_t) = −α_t · (1 − p_t)^γ · log(p_t)`
//!
//! The factor `(1 − p_t)^γ` shrinks the loss of examples the model already classifies well, so
//! training concentrates on the hard ones (class imbalance, noisy easy majorities). `γ = 0` with
//! no `alpha` is the plain cross-entropy.
//!
//! Configuration: `gamma` (`γ ≥ 0`, default 2, the paper's choice) and `alpha`, either one
//! weight per class (`[0.25, 0.75]`), or one number `α` for two-class problems in the paper's
//! convention: `α` for class 1 and `1 − α` for class 0 (the paper's best was 0.25). Without
//! `alpha` every class weighs 1.

use whetstone_sdk::prelude::*;

fn default_gamma() -> f64 {
    2.0
}

/// `alpha`: a binary weight or one weight per class.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Alpha {
    /// Two classes: `α` for class 1, `1 − α` for class 0.
    Binary(f64),
    /// One weight per class.
    PerClass(Vec<f64>),
}

impl Alpha {
    /// The weight of every class, for `classes` classes.
    fn per_class(&self, classes: usize) -> Result<Vec<f64>> {
        match self {
            Alpha::Binary(a) if classes == 2 => Ok(vec![1.0 - a, *a]),
            Alpha::Binary(a) => Err(Error::config(format!(
                "alpha = {a} is the two-class form (α for class 1, 1 − α for class 0) but the \
                 logits have {classes} classes: give a list with one weight per class"
            ))),
            Alpha::PerClass(w) if w.len() == classes => Ok(w.clone()),
            Alpha::PerClass(w) => Err(Error::config(format!(
                "alpha has {} entries but the logits have {classes} classes: give one weight \
                 per class",
                w.len()
            ))),
        }
    }
}

/// The configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FocalConfig {
    /// `γ ≥ 0`: how strongly well-classified examples are down-weighted.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// `α`: class weights (see the crate docs); none weighs every class 1.
    #[serde(default)]
    pub alpha: Option<Alpha>,
}

/// The focal loss.
pub struct Focal {
    cfg: FocalConfig,
}

/// The smallest `1 − p_t` raised to `γ`, so that `γ < 1` never meets `0^(γ−1)` in the gradient.
const MIN_MISSING_PROBABILITY: f64 = 1e-30;

impl Loss for Focal {
    type Config = FocalConfig;

    fn new(cfg: FocalConfig) -> Result<Self> {
        if !(cfg.gamma.is_finite() && cfg.gamma >= 0.0) {
            return Err(Error::config(format!(
                "gamma = {} must be a finite number ≥ 0 (0 is the cross-entropy; the paper uses 2)",
                cfg.gamma
            )));
        }
        let weights = match &cfg.alpha {
            None => Vec::new(),
            Some(Alpha::Binary(a)) => vec![*a, 1.0 - a],
            Some(Alpha::PerClass(w)) if w.is_empty() => {
                return Err(Error::config("alpha = [] must hold one weight per class"));
            }
            Some(Alpha::PerClass(w)) => w.clone(),
        };
        if weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(Error::config(format!(
                "alpha = {:?} must give finite, non-negative weights (a number must be in [0, 1])",
                cfg.alpha
            )));
        }
        Ok(Focal { cfg })
    }

    fn config_fields() -> Vec<ConfigField> {
        vec![
            ConfigField::new(
                "gamma",
                "float",
                "2.0",
                "γ: the loss of a position is scaled by (1 − p_t)^γ; 0 is the cross-entropy",
            ),
            ConfigField::new(
                "alpha",
                "float or list of floats",
                "none",
                "class weights α_t: a list (one per class) or, for two classes, α for class 1 and \
                 1 − α for class 0",
            ),
        ]
    }

    fn compute(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: &Tensor,
        _teacher: Option<&Tensor>,
    ) -> Result<Tensor> {
        let kept = f64::from(mask.sum_all()?.to_scalar()?).max(1.0);
        let log_pt = logits
            .log_softmax(-1)?
            .gather(labels.unsqueeze(-1)?, -1)?
            .squeeze(-1)?;
        let mut per_position = log_pt.neg()?;
        if self.cfg.gamma != 0.0 {
            let focus = log_pt
                .exp()?
                .neg()?
                .add_scalar(1.0)?
                .clamp(MIN_MISSING_PROBABILITY, 1.0)?
                .powf(self.cfg.gamma)?;
            per_position = per_position.mul(focus)?;
        }
        let mut weight = mask.clone();
        if let Some(alpha) = &self.cfg.alpha {
            let classes = logits.dim(-1)?;
            let alpha: Vec<f32> = alpha
                .per_class(classes)?
                .into_iter()
                .map(|a| a as f32)
                .collect();
            let shape: Vec<i64> = labels.shape()?.iter().map(|&d| d as i64).collect();
            let alpha_t = Tensor::from_slice(&alpha, &[classes])?
                .index_select(labels.reshape(&[-1])?, 0)?
                .reshape(&shape)?;
            weight = weight.mul(alpha_t)?;
        }
        per_position.mul(weight)?.sum_all()?.scale(1.0 / kept)
    }
}

whetstone_sdk::register_loss!(Focal);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> std::result::Result<Focal, Error> {
        Focal::new(serde_json::from_str(json)?)
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        for json in [
            r#"{"gamma": -1}"#,
            r#"{"alpha": 1.5}"#,
            r#"{"alpha": []}"#,
            r#"{"alpha": [0.5, -1]}"#,
        ] {
            assert!(config(json).is_err(), "{json}");
        }
        assert!(config(r#"{"gama": 2}"#).is_err());
        let cfg: FocalConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg.gamma, 2.0);
        assert!(cfg.alpha.is_none());
    }

    #[test]
    fn a_number_alpha_is_the_two_class_form() {
        assert_eq!(Alpha::Binary(0.25).per_class(2).unwrap(), vec![0.75, 0.25]);
        let err = Alpha::Binary(0.25).per_class(3).unwrap_err().to_string();
        assert!(err.contains("3 classes"), "{err}");
        let err = Alpha::PerClass(vec![1.0])
            .per_class(2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 entries"), "{err}");
    }
}
