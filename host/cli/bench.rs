//! `whet bench`: performance figures printed as JSON (our baselines; never asserted in tests),
//! and the method table (`whet bench methods`, Markdown).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use whetstone_host::bench::gemm::{time_gemm, DEFAULT_SHAPES};
use whetstone_host::bench::{bench_gemm, bench_train, GemmShape, StepPhases, TrainBench};
use whetstone_host::recipe::{MethodSpec, TrainingConfig};
use whetstone_host::train::run::apply_method_with_plugins;
use whetstone_host::train::Trainer;

use crate::model_arg::ModelOptions;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time training steps (forward, backward, AdamW update) on random token batches.
    Train(TrainArgs),
    /// Train each recipe (one process each) and print a Markdown table: held-out accuracy,
    /// accuracy at start, trainable parameters, seconds per step, peak RSS.
    Methods(crate::bench_methods::MethodsArgs),
    /// Time f32 matrix products (GFLOP/s per shape, and the peak that `bench train`'s model
    /// FLOPs utilisation is measured against).
    Gemm(GemmArgs),
}

/// Options of `whet bench gemm`.
#[derive(Debug, Args)]
pub struct GemmArgs {
    /// A product `MxNxK` (`[M, K] · [K, N]`) to time (repeatable); by default two large squares
    /// and the products of a SmolLM2-135M step at batch 8 × 128.
    #[arg(long = "shape", value_name = "MxNxK")]
    shapes: Vec<GemmShape>,
    /// Seconds to spend on each shape (at least three products each).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Where to compute: `cpu`, `cuda`, `cuda:N` or `metal`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Options of `whet bench train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A `.gguf` file, a Hugging Face model directory or `asset:NAME`.
    #[arg(long, short = 'm')]
    model: String,
    #[command(flatten)]
    options: ModelOptions,
    /// Examples per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per example.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps run first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Glob over parameter names to train (repeatable), e.g. `model.layers.29.*`; every
    /// parameter trains when neither this nor `--method` is given.
    #[arg(long, conflicts_with = "method")]
    trainable: Vec<String>,
    /// A method as the JSON of a recipe's `[method]` section, e.g.
    /// `'{"kind": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}'`
    /// (the plugin is found as `whet train` finds it).
    #[arg(long, value_name = "JSON")]
    method: Option<String>,
    /// Seed of the random batches and of any new head.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Causal LMs: compute the loss from the full `[batch, seq, vocab]` logits instead of the
    /// default chunked loss (`training.chunked_lm_loss = false`), to compare the two.
    #[arg(long)]
    full_logits: bool,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations
    /// (`training.gradient_checkpointing = true`).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// The f32 GEMM peak in GFLOP/s that model FLOPs utilisation (`mfu`) is reported against;
    /// by default a 2048³ product is timed for a second before the steps (`whet bench gemm`).
    #[arg(long, value_name = "GFLOPS")]
    gemm_peak: Option<f64>,
}

/// Runs a `bench` subcommand and prints its JSON report on stdout.
pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Train(args) => train(args),
        BenchCommand::Methods(args) => crate::bench_methods::run(args),
        BenchCommand::Gemm(args) => gemm(args),
    }
}

/// `whet bench gemm`.
fn gemm(args: GemmArgs) -> Result<()> {
    let device = whetstone_host::device::parse_device(&args.device)?;
    let shapes = if args.shapes.is_empty() {
        DEFAULT_SHAPES.to_vec()
    } else {
        args.shapes
    };
    let report = bench_gemm(&shapes, &device, args.seconds)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// `whet bench train`.
fn train(args: TrainArgs) -> Result<()> {
    let loaded = args.options.load(&args.model, args.seed)?;
    let model = loaded.model.as_ref();
    let params = model.params();
    params.freeze_all()?;
    let mut adapter = None;
    if let Some(json) = &args.method {
        let spec: MethodSpec = serde_json::from_str(json)
            .with_context(|| format!("--method {json}: not a [method] section as JSON"))?;
        adapter = apply_method_with_plugins(model, &spec, &[], args.seed)?;
    } else if args.trainable.is_empty() {
        for param in params.iter() {
            param.set_trainable(true)?;
        }
    } else {
        params.set_trainable_by_patterns(&args.trainable)?;
    }
    let total_steps = args.warmup + args.steps;
    // A constant learning rate keeps every timed step doing the same work.
    let cfg = TrainingConfig {
        lr_scheduler: whetstone_host::train::schedule::SchedulerKind::Constant,
        chunked_lm_loss: !args.full_logits,
        gradient_checkpointing: args.gradient_checkpointing,
        ..TrainingConfig::default()
    };
    let mut trainer = Trainer::with_method(model, adapter, &cfg, total_steps)
        .context("setting up the optimizer")?;
    let device = whetstone_host::device::parse_device(&args.options.device)?;
    let gemm_peak_gflops = match args.gemm_peak {
        Some(peak) => peak,
        None => {
            time_gemm(DEFAULT_SHAPES[0], &device, 1.0, false)
                .context("timing the GEMM peak (pass --gemm-peak to skip)")?
                .gflops
        }
    };
    let bench = TrainBench {
        model: args.model.clone(),
        batch: args.batch,
        seq: args.seq.min(loaded.max_positions),
        steps: args.steps,
        warmup: args.warmup,
        vocab_size: loaded.tokenizer.get_vocab_size(true),
        task: model.task(),
        seed: args.seed,
        loss: match (model.task(), args.full_logits) {
            (whetstone_host::model::TaskKind::CausalLm, false) => "chunked",
            _ => "full logits",
        }
        .into(),
        gradient_checkpointing: args.gradient_checkpointing,
        gemm_peak_gflops: Some(gemm_peak_gflops),
    };
    let counts = (trainer.num_trainable(), params.num_params());
    let report = bench_train(&bench, &device, counts, &mut |batch| {
        trainer
            .train_step(model, std::slice::from_ref(batch))
            .map(|s| StepPhases {
                forward: s.forward_s,
                backward: s.backward_s,
                optimizer: s.optimizer_s,
                data: 0.0,
            })
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
