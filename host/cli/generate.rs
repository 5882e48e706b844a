//! `whet generate`: stream a continuation (or a chat answer) from a causal language model.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use whetstone_host::model::generate::{generate, GenerateOptions};

use crate::adapter_arg::AdapterOptions;
use crate::model_arg::ModelOptions;

/// Options of `whet generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A `.gguf` file, a Hugging Face model directory or `asset:NAME`.
    #[arg(long, short = 'm')]
    model: String,
    #[command(flatten)]
    options: ModelOptions,
    #[command(flatten)]
    adapter: AdapterOptions,
    /// The text to continue (or, with `--chat`, the user's message).
    #[arg(long, short = 'p')]
    prompt: String,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling threshold (1 keeps every token).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampler (same seed, same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt in the model's chat template (ChatML when it ships none).
    #[arg(long)]
    chat: bool,
    /// System message for `--chat`.
    #[arg(long)]
    system: Option<String>,
}

/// Runs `whet generate`: tokens go to stdout as they come, figures to stderr.
pub fn run(args: GenerateArgs) -> Result<()> {
    let loaded = args.options.load(&args.model, args.seed)?;
    let _adapter = args.adapter.attach(loaded.model.as_ref())?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        chat: args.chat,
        system: args.system,
    };
    let mut stdout = std::io::stdout().lock();
    if !opts.chat {
        write!(stdout, "{}", args.prompt)?;
    }
    let mut write_error = None;
    let generation = generate(&loaded, &args.prompt, &opts, &mut |piece| {
        if write_error.is_none() {
            if let Err(e) = write!(stdout, "{piece}").and_then(|()| stdout.flush()) {
                write_error = Some(e);
            }
        }
    })?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    writeln!(stdout)?;
    eprintln!(
        "[{} prompt tokens, {} generated, {:.1} tokens/s, {:.2} s]",
        generation.prompt_tokens,
        generation.token_ids.len(),
        generation.tokens_per_second,
        generation.seconds
    );
    Ok(())
}
