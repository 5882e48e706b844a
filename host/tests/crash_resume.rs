//! Crash safety of `whet train`: a run killed with SIGKILL (during a checkpoint write, and at
//! random moments) resumes with `--resume` from its last complete checkpoint, and the resumed
//! run's loss sequence and final weights equal those of a run never interrupted.
//!
//! Uses the real all-MiniLM-L6-v2 (fails, never skips, when the asset is missing).

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use whetstone_host::train::checkpoint;
use whetstone_host::train::metrics::{read_metrics, MetricsRecord};

/// Optimizer steps of the run: 48 examples in batches of 8, two epochs.
const STEPS: usize = 12;

fn write_inputs(dir: &Path) -> PathBuf {
    let data = dir.join("data.jsonl");
    let mut lines = String::new();
    for i in 0..24 {
        lines.push_str(&format!(
            "{{\"text\": \"a wonderful, moving film number {i}\", \"label\": 1}}\n\
             {{\"text\": \"a dull and tiresome mess, part {i}\", \"label\": 0}}\n"
        ));
    }
    std::fs::write(&data, lines).unwrap();
    data
}

fn write_recipe(dir: &Path, data: &Path, out: &Path) -> PathBuf {
    let recipe = dir.join(format!(
        "{}.toml",
        out.file_name().unwrap().to_string_lossy()
    ));
    let text = format!(
        r#"
[model]
path = "asset:all-minilm-l6-v2"
task = "classification"
num_labels = 2
pooling = "mean"

[data]
train = ["{data}"]
text_field = "text"
label_field = "label"
validation_ratio = 0.0
max_seq_len = 16

[method]
kind = "partial"
trainable = ["classifier.*", "encoder.layer.5.*"]

[training]
learning_rate = 1e-3
weight_decay = 0.01
epochs = 2
batch_size = 8
max_grad_norm = 1.0
log_every = 1
seed = 7

[output]
dir = "{out}"
save_every = 1
save_best = false
plot = false
"#,
        data = data.display(),
        out = out.display()
    );
    std::fs::write(&recipe, text).unwrap();
    recipe
}

fn spawn_train(recipe: &Path, resume: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_whet"));
    cmd.arg("train")
        .arg(recipe)
        .args(["--no-progress", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    cmd.spawn().unwrap()
}

fn finish(child: Child, what: &str) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `out` holds a checkpoint staging directory (a write in progress).
fn writing_checkpoint(out: &Path) -> bool {
    std::fs::read_dir(out).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".last.tmp"))
    })
}

/// The step of the loadable checkpoint in `out/last`, if there is one.
fn checkpoint_step(out: &Path) -> Option<usize> {
    checkpoint::load(&out.join("last"), &Device::Cpu)
        .ok()
        .map(|c| c.state.step)
}

/// The training losses of the metrics file, by step.
fn losses(out: &Path) -> Vec<(usize, f64)> {
    read_metrics(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            MetricsRecord::Train { step, loss, .. } => Some((step, loss)),
            MetricsRecord::Eval { .. } => None,
        })
        .collect()
}

/// Kills `child` (SIGKILL) as soon as `out` holds a staging directory while a complete
/// checkpoint already exists; returns whether it caught one (false: the run ended first).
fn kill_during_a_checkpoint_write(mut child: Child, out: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if out.join("last").join(checkpoint::STATE_FILE).is_file() && writing_checkpoint(out) {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    panic!("the run neither wrote a checkpoint nor ended in 300 s");
}

#[test]
fn a_run_killed_at_any_moment_resumes_to_the_uninterrupted_result() {
    whetstone_host::assets::resolve_path("asset:all-minilm-l6-v2")
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let data = write_inputs(dir.path());

    let reference_out = dir.path().join("reference");
    let reference = write_recipe(dir.path(), &data, &reference_out);
    let start = Instant::now();
    finish(spawn_train(&reference, false), "the uninterrupted run");
    let run_time = start.elapsed();
    let expected = losses(&reference_out);
    assert_eq!(
        expected.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>()
    );

    let out = dir.path().join("killed");
    let recipe = write_recipe(dir.path(), &data, &out);
    let mut rng = StdRng::seed_from_u64(2026);
    let mut kills = Vec::new();
    // First a kill in the middle of a checkpoint write, then at random moments of the run.
    let caught = kill_during_a_checkpoint_write(spawn_train(&recipe, false), &out);
    assert!(caught, "the run ended before a second checkpoint write");
    kills.push("during a checkpoint write".to_string());
    for _ in 0..4 {
        let step = checkpoint_step(&out).expect("a complete checkpoint survives every kill");
        if step == STEPS {
            break;
        }
        let mut child = spawn_train(&recipe, true);
        let delay = run_time.mul_f64(rng.random_range(0.2..0.9));
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            kills.push(format!(
                "{:.2} s after a resume from step {step}",
                delay.as_secs_f64()
            ));
        }
    }
    let step = checkpoint_step(&out).expect("a complete checkpoint survives every kill");
    eprintln!(
        "killed {} times ({kills:?}); finishing from step {step}",
        kills.len()
    );
    assert!(
        kills.len() >= 2,
        "at least one random kill landed: {kills:?}"
    );
    if step < STEPS {
        finish(spawn_train(&recipe, true), "the resumed run");
    }

    assert_eq!(losses(&out), expected, "the resumed loss sequence differs");
    let (got, want) = (
        checkpoint::load(&out.join("last"), &Device::Cpu).unwrap(),
        checkpoint::load(&reference_out.join("last"), &Device::Cpu).unwrap(),
    );
    assert_eq!(got.state.step, STEPS);
    for (name, w) in &want.params {
        let g = &got.params[name];
        let diff = (g - w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name} differs from the uninterrupted run's");
    }
}
