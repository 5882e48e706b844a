//! Cross-entropy as a Whetstone loss plugin, with PyTorch's `CrossEntropyLoss` options.
//!
//! With log-probabilities `log p = log_softmax(z)` over `C` classes, label `y`, class weights
//! `w` (all 1 when `weight` is not set) and label smoothing `ε`, the loss of a batch over the
//! positions `i` the mask keeps is PyTorch's, term for term:
//!
//! `L = (1 − ε) · Σᵢ w_yᵢ (−log p_i,yᵢ) / Σᵢ w_yᵢ  +  (ε / C) · Σᵢ Σ_c w_c (−log p_i,c) / Σᵢ w_yᵢ`
//!
//! (Szegedy et al. 2016 for label smoothing). With neither option it is the mean negative
//! log-likelihood of the kept positions: the host's default loss, which the host computes with
//! a fused native kernel when no `[loss]` is configured; the host's tests prove the two equal.
//!
//! Kept positions are the ones the host's mask keeps (classification: every example; causal
//! LM: the predicted tokens, so prompt and padding — Hugging Face's `-100` labels — never count).
//! `ignore_index` additionally drops the positions whose label is that id, as PyTorch's option
//! of the same name does.
//!
//! Configuration: `label_smoothing` (`ε`, default 0), `weight` (one weight per class, default
//! none), `ignore_index` (a class or token id, default -100: nothing beyond the host's mask).

use whetstone_sdk::prelude::*;
use whetstone_sdk::DType;

/// PyTorch's default `ignore_index`: no label has it, so it drops nothing the host kept.
const NO_IGNORED_LABEL: i64 = -100;

fn default_ignore_index() -> i64 {
    NO_IGNORED_LABEL
}

/// The configuration (PyTorch's `CrossEntropyLoss` argument names).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossEntropyConfig {
    /// `ε` in `[0, 1]`: the share of the target spread evenly over all classes.
    #[serde(default)]
    pub label_smoothing: f64,
    /// One non-negative weight per class (the logits' last dimension).
    #[serde(default)]
    pub weight: Option<Vec<f64>>,
    /// Positions whose label is this id do not count (negative: none beyond the host's mask).
    #[serde(default = "default_ignore_index")]
    pub ignore_index: i64,
}

/// The cross-entropy loss.
pub struct CrossEntropy {
    cfg: CrossEntropyConfig,
}

impl CrossEntropy {
    /// The host's mask with the positions labelled `ignore_index` also dropped.
    fn kept(&self, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if self.cfg.ignore_index < 0 {
            return Ok(mask.clone());
        }
        // Labels are integers, so |label − ignored| is 0 on an ignored position and ≥ 1
        // elsewhere: clamped to [0, 1] it is the indicator of "not ignored".
        let not_ignored = labels
            .to_dtype(DType::F32)?
            .add_scalar(-(self.cfg.ignore_index as f64))?
            .abs()?
            .clamp(0.0, 1.0)?;
        mask.mul(not_ignored)
    }

    /// The class weights as a tensor `[classes]`, checked against the logits.
    fn weights(&self, classes: usize) -> Result<Option<Tensor>> {
        let Some(w) = &self.cfg.weight else {
            return Ok(None);
        };
        if w.len() != classes {
            return Err(Error::config(format!(
                "weight has {} entries but the logits have {classes} classes: give one weight \
                 per class",
                w.len()
            )));
        }
        let w: Vec<f32> = w.iter().map(|&x| x as f32).collect();
        Tensor::from_slice(&w, &[classes]).map(Some)
    }
}

impl Loss for CrossEntropy {
    type Config = CrossEntropyConfig;

    fn new(cfg: CrossEntropyConfig) -> Result<Self> {
        if !(0.0..=1.0).contains(&cfg.label_smoothing) {
            return Err(Error::config(format!(
                "label_smoothing = {} must be between 0 (none) and 1 (0.1 is usual)",
                cfg.label_smoothing
            )));
        }
        if let Some(w) = &cfg.weight {
            if w.is_empty() || w.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
                return Err(Error::config(format!(
                    "weight = {w:?} must hold one finite, non-negative weight per class"
                )));
            }
        }
        Ok(CrossEntropy { cfg })
    }

    fn config_fields() -> Vec<ConfigField> {
        vec![
            ConfigField::new(
                "label_smoothing",
                "float",
                "0.0",
                "ε: the target is (1 − ε)·one-hot + ε/C spread over all C classes",
            ),
            ConfigField::new(
                "weight",
                "list of floats",
                "none",
                "one weight per class; the mean is weighted by the labels' weights (PyTorch)",
            ),
            ConfigField::new(
                "ignore_index",
                "int",
                "-100",
                "positions labelled with this id do not count (prompt and padding never count)",
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
        let classes = logits.dim(-1)?;
        let kept = self.kept(labels, mask)?;
        let log_probs = logits.log_softmax(-1)?;
        let nll = log_probs
            .gather(labels.unsqueeze(-1)?, -1)?
            .squeeze(-1)?
            .neg()?;
        let weights = self.weights(classes)?;
        // Per position: the weight of its label, 0 where the position does not count.
        let label_weight = match &weights {
            None => kept.clone(),
            Some(w) => {
                let shape: Vec<i64> = labels.shape()?.iter().map(|&d| d as i64).collect();
                w.index_select(labels.reshape(&[-1])?, 0)?
                    .reshape(&shape)?
                    .mul(&kept)?
            }
        };
        let total = f64::from(label_weight.sum_all()?.to_scalar()?);
        if total <= 0.0 {
            // Nothing counts in this batch (PyTorch would give NaN): a zero loss, no gradient.
            return nll.mul(&label_weight)?.sum_all();
        }
        let hard = nll.mul(&label_weight)?.sum_all()?.scale(1.0 / total)?;
        let eps = self.cfg.label_smoothing;
        if eps == 0.0 {
            return Ok(hard);
        }
        let per_class = match &weights {
            None => log_probs,
            Some(w) => log_probs.mul(w)?,
        };
        let smooth = per_class
            .sum(&[-1], false)?
            .neg()?
            .mul(&kept)?
            .sum_all()?
            .scale(eps / (classes as f64 * total))?;
        hard.scale(1.0 - eps)?.add(&smooth)
    }
}

whetstone_sdk::register_loss!(CrossEntropy);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> std::result::Result<CrossEntropy, Error> {
        CrossEntropy::new(serde_json::from_str(json)?)
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        for json in [
            r#"{"label_smoothing": 1.5}"#,
            r#"{"label_smoothing": -0.1}"#,
            r#"{"weight": []}"#,
            r#"{"weight": [1.0, -2.0]}"#,
        ] {
            assert!(config(json).is_err(), "{json}");
        }
        let unknown = config(r#"{"label_smoothin": 0.1}"#).err().unwrap();
        assert!(unknown.to_string().contains("label_smoothin"), "{unknown}");
        let cfg: CrossEntropyConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg.label_smoothing, 0.0);
        assert_eq!(cfg.ignore_index, -100);
        assert!(cfg.weight.is_none());
    }
}
