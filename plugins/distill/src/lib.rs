//! Knowledge distillation as a Whetstone loss plugin.
//!
//! Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network". With the
//! student's logits `s`, the teacher's logits `t`, the labels `y`, temperature `T` and weight
//! `α`, the loss of a batch is
//!
//! `L = α · T² · KL(softmax(t / T) ‖ softmax(s / T)) + (1 − α) · CE(s, y)`
//!
//! with both terms averaged over the positions the mask keeps (examples of a classifier,
//! predicted tokens of a causal LM). The factor `T²` keeps the soft term's gradients on the
//! scale of the hard term's whatever the temperature. The student trains with any PEFT method;
//! the recipe names this loss in `[loss]` and the teacher in `[teacher]`, and the host hands the
//! teacher's logits to every call.
//!
//! Configuration: `temperature` (`T`, default 2.0) and `alpha` (`α`, default 0.5; 0 is the plain
//! cross-entropy and needs no teacher, 1 learns from the teacher alone).

use whetstone_sdk::prelude::*;

fn default_temperature() -> f64 {
    2.0
}

fn default_alpha() -> f64 {
    0.5
}

/// The configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// `T`: both distributions are softened by dividing the logits by it.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// `α`: the weight of the soft (teacher) term; `1 − α` weighs the hard cross-entropy.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

/// The distillation loss.
pub struct Distill {
    cfg: DistillConfig,
}

impl Distill {
    /// The mean over kept positions of the cross-entropy of `logits` against `labels`.
    fn hard(&self, logits: &Tensor, labels: &Tensor, mask: &Tensor, kept: f64) -> Result<Tensor> {
        let log_probs = logits.log_softmax(-1)?;
        let picked = log_probs.gather(labels.unsqueeze(-1)?, -1)?.squeeze(-1)?;
        picked.mul(mask)?.sum_all()?.scale(-1.0 / kept)
    }

    /// The mean over kept positions of `KL(softmax(t/T) ‖ softmax(s/T))`.
    fn soft(&self, logits: &Tensor, teacher: &Tensor, mask: &Tensor, kept: f64) -> Result<Tensor> {
        let inv_t = 1.0 / self.cfg.temperature;
        let student = logits.scale(inv_t)?.log_softmax(-1)?;
        let target = teacher.scale(inv_t)?.log_softmax(-1)?;
        let per_position = target
            .exp()?
            .mul(target.sub(&student)?)?
            .sum(&[-1], false)?;
        per_position.mul(mask)?.sum_all()?.scale(1.0 / kept)
    }
}

impl Loss for Distill {
    type Config = DistillConfig;

    fn new(cfg: DistillConfig) -> Result<Self> {
        if !(cfg.temperature.is_finite() && cfg.temperature > 0.0) {
            return Err(Error::config(format!(
                "temperature = {} must be a finite number > 0 (1 leaves the logits as they are; \
                 2 to 4 is usual)",
                cfg.temperature
            )));
        }
        if !(0.0..=1.0).contains(&cfg.alpha) {
            return Err(Error::config(format!(
                "alpha = {} must be between 0 (hard labels only) and 1 (teacher only)",
                cfg.alpha
            )));
        }
        Ok(Distill { cfg })
    }

    fn config_fields() -> Vec<ConfigField> {
        vec![
            ConfigField::new(
                "temperature",
                "float",
                "2.0",
                "T: the logits of student and teacher are divided by it before the KL term",
            ),
            ConfigField::new(
                "alpha",
                "float",
                "0.5",
                "weight of the teacher term α·T²·KL; the hard cross-entropy gets 1 − α",
            ),
        ]
    }

    fn compute(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: &Tensor,
        teacher: Option<&Tensor>,
    ) -> Result<Tensor> {
        let kept = f64::from(mask.sum_all()?.to_scalar()?).max(1.0);
        let alpha = self.cfg.alpha;
        let hard = self.hard(logits, labels, mask, kept)?;
        if alpha == 0.0 {
            return Ok(hard);
        }
        let teacher = teacher.ok_or_else(|| {
            Error::config(
                "the distill loss needs a teacher: add a [teacher] section to the recipe (or set \
                 alpha = 0 for the plain cross-entropy)",
            )
        })?;
        let t = self.cfg.temperature;
        let soft = self
            .soft(logits, teacher, mask, kept)?
            .scale(alpha * t * t)?;
        if alpha == 1.0 {
            return Ok(soft);
        }
        soft.add(&hard.scale(1.0 - alpha)?)
    }
}

whetstone_sdk::register_loss!(Distill);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_settings_are_refused() {
        for json in [
            r#"{"temperature": 0}"#,
            r#"{"alpha": 1.5}"#,
            r#"{"alpha": -0.1}"#,
        ] {
            let cfg: DistillConfig = serde_json::from_str(json).unwrap();
            assert!(Distill::new(cfg).is_err(), "{json}");
        }
        let unknown: std::result::Result<DistillConfig, _> =
            serde_json::from_str(r#"{"temprature": 2}"#);
        assert!(unknown.unwrap_err().to_string().contains("temprature"));
        let cfg: DistillConfig = serde_json::from_str("{}").unwrap();
        assert_eq!((cfg.temperature, cfg.alpha), (2.0, 0.5));
    }
}
