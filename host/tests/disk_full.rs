//! A checkpoint write that fails part-way, as on a full disk, is an error naming the file, and
//! the previous checkpoint stays intact and loadable. The failure comes from a file-size limit
//! (`RLIMIT_FSIZE`, with `SIGXFSZ` ignored so that the write returns `EFBIG`), which is why this
//! test has a binary of its own: the limit applies to the whole process.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use whetstone_host::train::checkpoint::{self, TrainerState};

/// Sets the soft limit on the size of files this process writes.
fn limit_file_size(bytes: libc::rlim_t) {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain system calls with valid arguments; SIGXFSZ is ignored so that an oversized
    // write fails with EFBIG instead of ending the process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

fn tensors(n: usize, value: f64) -> HashMap<String, Tensor> {
    let t = (Tensor::ones(n, DType::F32, &Device::Cpu).unwrap() * value).unwrap();
    HashMap::from([("w".to_string(), t)])
}

#[test]
fn a_checkpoint_write_that_runs_out_of_space_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let last = dir.path().join("last");
    let mut state = TrainerState::new(7, 10);
    state.step = 3;
    checkpoint::save(&last, &tensors(16, 1.0), &tensors(16, 0.5), &state).unwrap();

    state.step = 4;
    limit_file_size(64 << 10);
    let result = checkpoint::save(&last, &tensors(1 << 20, 2.0), &tensors(16, 0.5), &state);
    limit_file_size(libc::RLIM_INFINITY);

    let err = result.expect_err("a 4 MiB tensor file cannot be written under a 64 KiB limit");
    let message = err.to_string();
    assert!(
        message.contains(checkpoint::PARAMS_FILE) && message.contains("cannot write"),
        "{message}"
    );
    let back = checkpoint::load(&last, &Device::Cpu).unwrap();
    assert_eq!(
        back.state.step, 3,
        "the previous checkpoint is the one on disk"
    );
    assert_eq!(back.params["w"].to_vec1::<f32>().unwrap(), vec![1.0f32; 16]);
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "last")
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
}
