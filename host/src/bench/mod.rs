//! Measured figures for `whet bench`: step-time statistics, throughput and peak memory.
//!
//! Benchmarks are commands, never timed assertions in tests (see `DESIGN.md`). The driver here
//! is independent of the trainer: [`bench_train`] feeds random batches to any step function and
//! reports what it measured.

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::model::{Batch, TaskKind};
use crate::{Error, Result};

pub mod gemm;

pub use gemm::{bench_gemm, GemmReport, GemmShape};

/// Median, minimum and maximum of a set of timings, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimingStats {
    /// The median (mean of the two middle values for an even count).
    pub median: f64,
    /// The fastest sample.
    pub min: f64,
    /// The slowest sample.
    pub max: f64,
}

impl TimingStats {
    /// Statistics of `samples`; `None` when there are none.
    pub fn from_samples(samples: &[f64]) -> Option<Self> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// Peak resident set size of this process in MiB (`VmHWM` of `/proc/self/status`).
///
/// `None` where the kernel does not report it (not Linux).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm_kb(&status).map(|kb| kb as f64 / 1024.0)
}

/// The `VmHWM:` value (kB) of a `/proc/<pid>/status` text.
fn parse_vm_hwm_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// A batch of uniformly random token ids with a full attention mask, shaped for `task`:
/// causal-LM labels are the input ids, classification labels are random classes.
pub fn random_batch(
    vocab_size: usize,
    batch: usize,
    seq: usize,
    task: TaskKind,
    device: &Device,
    rng: &mut StdRng,
) -> Result<Batch> {
    if vocab_size == 0 || batch == 0 || seq == 0 {
        return Err(Error::config(format!(
            "a benchmark batch needs a vocabulary, batch and sequence length ≥ 1 (got {vocab_size}, {batch}, {seq})"
        )));
    }
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab_size as u32))
        .collect();
    let input_ids = Tensor::from_vec(ids.clone(), (batch, seq), device)?;
    let attention_mask = Tensor::ones((batch, seq), candle_core::DType::U32, device)?;
    let labels = match task {
        TaskKind::CausalLm => Tensor::from_vec(
            ids.iter().map(|&i| i64::from(i)).collect::<Vec<i64>>(),
            (batch, seq),
            device,
        )?,
        TaskKind::SequenceClassification { num_labels } => {
            let classes: Vec<i64> = (0..batch)
                .map(|_| rng.random_range(0..num_labels.max(1) as i64))
                .collect();
            Tensor::from_vec(classes, batch, device)?
        }
    };
    Ok(Batch {
        input_ids,
        attention_mask,
        labels,
        num_tokens: batch * seq,
    })
}

/// What to measure in a training benchmark.
#[derive(Debug, Clone)]
pub struct TrainBench {
    /// A label for the model (its path), copied into the report.
    pub model: String,
    /// Examples per step.
    pub batch: usize,
    /// Tokens per example.
    pub seq: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps run first (allocator and cache warm-up).
    pub warmup: usize,
    /// Vocabulary size the random ids are drawn from.
    pub vocab_size: usize,
    /// What the model's forward produces.
    pub task: TaskKind,
    /// Seed of the random batches.
    pub seed: u64,
    /// How the loss is computed (`"chunked"` or `"full logits"`), copied into the report.
    pub loss: String,
    /// Whether decoder layers are recomputed in the backward pass, copied into the report.
    pub gradient_checkpointing: bool,
    /// The f32 GEMM peak (GFLOP/s, from [`gemm::bench_gemm`]) that model FLOPs utilisation is
    /// reported against; none leaves it out.
    pub gemm_peak_gflops: Option<f64>,
}

/// The figures `whet bench train` prints as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchReport {
    /// The model label.
    pub model: String,
    /// How the loss was computed (`"chunked"` or `"full logits"`).
    pub loss: String,
    /// Whether decoder layers were recomputed in the backward pass instead of keeping their
    /// activations.
    pub gradient_checkpointing: bool,
    /// Examples per step.
    pub batch: usize,
    /// Tokens per example.
    pub seq: usize,
    /// Timed steps.
    pub steps: usize,
    /// Wall time of one training step (forward, backward, optimizer update).
    pub step_time_s: TimingStats,
    /// Median time of each phase of a step, as the step function measured it.
    pub phases_median_s: StepPhases,
    /// `batch × seq / median step time`.
    pub tokens_per_s: f64,
    /// Peak resident memory of the process in MiB, when the OS reports it.
    pub peak_rss_mb: Option<f64>,
    /// Number of trainable scalars.
    pub trainable_params: usize,
    /// Number of scalars in the model.
    pub total_params: usize,
    /// Model FLOPs of one step ([`model_flops_per_step`]).
    pub model_flops_per_step: f64,
    /// The GEMM peak the utilisation is measured against, in GFLOP/s.
    pub gemm_peak_gflops: Option<f64>,
    /// Model FLOPs utilisation: `model_flops_per_step / median step time / peak`.
    pub mfu: Option<f64>,
    /// The BLAS library the linear layers multiply with, or `None` for candle's kernels.
    pub blas: Option<String>,
    /// Threads of the CPU kernels (`RAYON_NUM_THREADS`, else the cores).
    pub threads: usize,
}

/// The matrix-product FLOPs of one training step, the usual estimate for model FLOPs
/// utilisation (Kaplan et al. 2020; PaLM's MFU): every parameter costs 2 FLOPs per token in the
/// forward pass and 2 more for the input gradient of the backward pass, and a trainable one 2
/// more for its own gradient — `tokens × (4 × total + 2 × trainable)`, so `6 N` per token when
/// everything trains and about `4 N` for a PEFT method over a frozen base. Attention's
/// `seq²` products are left out (under 3% of a SmolLM2 step at 128 tokens), embeddings are
/// counted as a product (exact for a tied output head), and recomputation under activation
/// checkpointing is not model work, so it lowers the utilisation. When only the top of a model
/// trains, the backward pass stops early and this overstates the work, so the utilisation can
/// exceed 1.
pub fn model_flops_per_step(tokens: usize, (trainable, total): (usize, usize)) -> f64 {
    tokens as f64 * (4.0 * total as f64 + 2.0 * trainable as f64)
}

/// How long the phases of one training step took, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepPhases {
    /// Forward pass and loss.
    pub forward: f64,
    /// Backward pass (gradients), including clipping.
    pub backward: f64,
    /// Optimizer update.
    pub optimizer: f64,
    /// Building the batch (random token ids moved to the device), outside the timed step.
    pub data: f64,
}

/// Runs `cfg.warmup` untimed and `cfg.steps` timed calls of `step` on fresh random batches
/// (built outside the timed region) and reports the figures.
pub fn bench_train(
    cfg: &TrainBench,
    device: &Device,
    (trainable_params, total_params): (usize, usize),
    step: &mut dyn FnMut(&Batch) -> Result<StepPhases>,
) -> Result<TrainBenchReport> {
    if cfg.steps == 0 {
        return Err(Error::config(
            "a benchmark needs at least one timed step (--steps ≥ 1)",
        ));
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut samples = Vec::with_capacity(cfg.steps);
    let mut phases = Vec::with_capacity(cfg.steps);
    for i in 0..cfg.warmup + cfg.steps {
        let data_start = Instant::now();
        let batch = random_batch(
            cfg.vocab_size,
            cfg.batch,
            cfg.seq,
            cfg.task,
            device,
            &mut rng,
        )?;
        let data_s = data_start.elapsed().as_secs_f64();
        let start = Instant::now();
        let phase = step(&batch)?;
        device.synchronize()?;
        if i >= cfg.warmup {
            samples.push(start.elapsed().as_secs_f64());
            phases.push(StepPhases {
                data: data_s,
                ..phase
            });
        }
    }
    let step_time_s = TimingStats::from_samples(&samples)
        .ok_or_else(|| Error::config("the benchmark recorded no step"))?;
    let median_of = |f: fn(&StepPhases) -> f64| {
        let values: Vec<f64> = phases.iter().map(f).collect();
        TimingStats::from_samples(&values).map_or(0.0, |t| t.median)
    };
    let phases_median_s = StepPhases {
        forward: median_of(|p| p.forward),
        backward: median_of(|p| p.backward),
        optimizer: median_of(|p| p.optimizer),
        data: median_of(|p| p.data),
    };
    let tokens = cfg.batch * cfg.seq;
    let model_flops = model_flops_per_step(tokens, (trainable_params, total_params));
    let mfu = cfg
        .gemm_peak_gflops
        .filter(|&peak| peak > 0.0)
        .map(|peak| model_flops / step_time_s.median.max(1e-12) / (peak * 1e9));
    Ok(TrainBenchReport {
        model: cfg.model.clone(),
        loss: cfg.loss.clone(),
        gradient_checkpointing: cfg.gradient_checkpointing,
        batch: cfg.batch,
        seq: cfg.seq,
        steps: cfg.steps,
        step_time_s,
        phases_median_s,
        tokens_per_s: tokens as f64 / step_time_s.median.max(1e-12),
        peak_rss_mb: peak_rss_mb(),
        trainable_params,
        total_params,
        model_flops_per_step: model_flops,
        gemm_peak_gflops: cfg.gemm_peak_gflops,
        mfu,
        blas: crate::ops::blas::backend(),
        threads: candle_core::utils::get_num_threads(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_stats_of_odd_and_even_counts() {
        let s = TimingStats::from_samples(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(
            TimingStats::from_samples(&[4.0, 1.0, 2.0, 3.0])
                .unwrap()
                .median,
            2.5
        );
        assert!(TimingStats::from_samples(&[]).is_none());
    }

    #[test]
    fn vm_hwm_is_parsed_and_read() {
        assert_eq!(
            parse_vm_hwm_kb("Name:\tx\nVmHWM:\t  123456 kB\nVmRSS:\t1 kB\n"),
            Some(123456)
        );
        assert_eq!(parse_vm_hwm_kb("Name:\tx\n"), None);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_mb().unwrap() > 1.0);
        }
    }

    #[test]
    fn random_batches_have_the_task_shapes() {
        let mut rng = StdRng::seed_from_u64(1);
        let b = random_batch(50, 2, 5, TaskKind::CausalLm, &Device::Cpu, &mut rng).unwrap();
        assert_eq!(b.input_ids.dims(), [2, 5]);
        assert_eq!(b.labels.dims(), [2, 5]);
        assert!(b
            .input_ids
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .all(|&i| i < 50));
        let b = random_batch(
            50,
            3,
            4,
            TaskKind::SequenceClassification { num_labels: 2 },
            &Device::Cpu,
            &mut rng,
        )
        .unwrap();
        assert_eq!(b.labels.dims(), [3]);
        assert!(random_batch(0, 1, 1, TaskKind::CausalLm, &Device::Cpu, &mut rng).is_err());
    }

    #[test]
    fn bench_driver_times_only_the_requested_steps() {
        let cfg = TrainBench {
            model: "m".into(),
            batch: 2,
            seq: 3,
            steps: 4,
            warmup: 2,
            vocab_size: 10,
            task: TaskKind::CausalLm,
            seed: 0,
            loss: "chunked".into(),
            gradient_checkpointing: false,
            gemm_peak_gflops: Some(1e-6),
        };
        let mut calls = 0;
        let report = bench_train(&cfg, &Device::Cpu, (1, 2), &mut |b| {
            calls += 1;
            assert_eq!(b.num_tokens, 6);
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(StepPhases {
                forward: 0.5,
                backward: 1.0 + calls as f64,
                optimizer: 0.25,
                data: 99.0,
            })
        })
        .unwrap();
        assert_eq!(calls, 6);
        assert!(report.step_time_s.min >= 0.002 && report.tokens_per_s > 0.0);
        assert!(serde_json::to_value(&report).unwrap()["step_time_s"]["median"].is_number());
        // Timed calls are 3..=6, so the median backward is 1 + 4.5; the data phase is the
        // driver's own measurement, not the step's.
        let phases = report.phases_median_s;
        assert_eq!(
            (phases.forward, phases.backward, phases.optimizer),
            (0.5, 5.5, 0.25)
        );
        assert!(phases.data < 1.0);
        // 6 tokens × (4 × 2 + 2 × 1) FLOPs, against a peak of 1e-6 GFLOP/s = 1000 FLOP/s.
        assert_eq!(report.model_flops_per_step, 60.0);
        let mfu = report.mfu.unwrap();
        let expected = 60.0 / report.step_time_s.median / 1000.0;
        assert!((mfu - expected).abs() < 1e-9 * expected);
    }
}
