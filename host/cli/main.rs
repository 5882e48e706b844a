//! `whet`: the command line of Whetstone, a parameter-efficient fine-tuning host.
//!
//! Each subcommand lives in its own module; this file parses the arguments, sets up logging
//! and prints errors with their whole cause chain.

mod adapter_arg;
mod assets;
mod bench;
mod bench_methods;
mod data;
mod demo;
mod generate;
mod inspect;
mod merge;
mod model_arg;
mod plugin;
mod quantize;
mod train;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// mimalloc: reported to cut an elementwise op on a 512×576 tensor from 0.83 ms to 0.08 ms
/// compared with the system allocator (large-GEMM steps measure the same either way; see
/// DEVELOPERS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Whetstone: parameter-efficient fine-tuning of real models, in Rust.
#[derive(Debug, Parser)]
#[command(name = "whet", version, about, propagate_version = true)]
struct Cli {
    /// More log output (-v: debug, -vv: trace); `RUST_LOG` overrides it.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Fine-tune a model as a recipe (TOML) describes.
    Train(train::TrainArgs),
    /// Evaluate a checkpoint of a recipe on its held-out data.
    Eval(train::EvalArgs),
    /// Generate text with a causal language model (tokens stream to stdout).
    Generate(generate::GenerateArgs),
    /// Fold a PEFT adapter into its base model and write the merged model directory.
    Merge(merge::MergeArgs),
    /// Show a model's architecture, parameter count, layers and linear module names.
    Inspect(inspect::InspectArgs),
    /// Measure what a quantization format does to a model's linear weights (QLoRA), and write
    /// a re-quantized GGUF copy.
    Quantize(quantize::QuantizeArgs),
    /// Measure performance (prints JSON).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Fetch, list, locate and verify the real models and datasets.
    #[command(subcommand)]
    Assets(assets::AssetsCommand),
    /// Fetch the default assets and fine-tune all-MiniLM-L6-v2 on UCI sentiment sentences.
    Demo(demo::DemoArgs),
    /// Create, build, list and check plugins (PEFT methods, losses, data loaders).
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Look at a recipe's data as the trainer sees it (tokenized, masked).
    #[command(subcommand)]
    Data(data::DataCommand),
}

/// Logs go to stderr; the level comes from `RUST_LOG`, else from `-v`.
fn init_tracing(verbose: u8) {
    // Plugins log through the target `plugin` (`whet_host::log` in the SDK).
    let default = match verbose {
        0 => "warn,whetstone_host=info,plugin=info",
        1 => "info,whetstone_host=debug,plugin=debug",
        _ => "debug,whetstone_host=trace,plugin=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // A second initialisation (impossible here) would only be ignored.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Train(args) => train::run_train(args),
        Command::Eval(args) => train::run_eval(args),
        Command::Generate(args) => generate::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Assets(command) => assets::run(command),
        Command::Demo(args) => demo::run(args),
        Command::Plugin(command) => plugin::run(command),
        Command::Data(command) => data::run(command),
    }
}

/// mimalloc's `mi_option_purge_delay` (its position in `mimalloc.h`'s `mi_option_t`; the Rust
/// bindings name only some options).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc waits before giving freed memory back to the OS, in ms (its default: 10;
/// -1: never). A training step frees and reallocates the same large buffers op after op, and
/// pages given back are faulted in (and zeroed by the kernel) again when the next forward pass
/// reuses them: with a 1 s delay, page clearing was 30% of the CPU samples of a SmolLM2 LoRA step
/// (whose backward pass frees the activations seconds before the next forward needs them), and
/// never giving memory back cut the step from 11.1 s to 5.7 s here, with the same peak RSS (the
/// memory is reused, not added to). `MIMALLOC_PURGE_DELAY` in the environment overrides it.
const PURGE_DELAY_MS: std::ffi::c_long = -1;

fn configure_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's documented options to a valid value; options are
        // atomics inside mimalloc, and this runs before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

/// candle runs its element-wise kernels on a pool of its own, `CANDLE_NUM_THREADS − 1` threads
/// (default: rayon's count) that spin 25 000 times after each kernel before they sleep, beside
/// rayon's pool, which runs every other kernel and the matrix products. On this project's
/// 2-core machines the spinning threads took the cores from the thread with the work: a SmolLM2
/// LoRA step took 2.57-2.66 s with candle's pool and 2.08-2.23 s with the element-wise kernels
/// on the calling thread (`CANDLE_NUM_THREADS=1`, what `whet` sets unless the environment
/// names a count).
fn configure_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet to read the environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() -> ExitCode {
    configure_allocator();
    configure_threads();
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    // Open OpenBLAS now, while this is the only thread: opening it may set OPENBLAS_CORETYPE.
    whetstone_host::ops::blas::backend();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            // Library errors already include their source's text (`path: reason`); print a
            // cause only when it adds something.
            let mut previous = error.to_string();
            for cause in error.chain().skip(1) {
                let text = cause.to_string();
                if !previous.contains(&text) {
                    eprintln!("  caused by: {text}");
                }
                previous = text;
            }
            ExitCode::FAILURE
        }
    }
}
