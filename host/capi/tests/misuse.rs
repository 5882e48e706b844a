//! Misuse of the C ABI is an error, not a crash: NULL and non-UTF-8 arguments, wrong ABI
//! version, invalid recipes, a missing plugin, dead and forged handles, double frees, small
//! buffers, calls into a busy session, and cancellation. The entry points are called as the
//! C side calls them (through the rlib of the same crate). Needs the MiniLM asset and the LoRA
//! plugin (`whet assets fetch`, `whet plugin build plugins/lora`), as CI installs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{null, null_mut};

use whetstone::infer::*;
use whetstone::session::*;
use whetstone::status::*;
use whetstone::text::*;
use whetstone::train::*;
use whetstone::WHETSTONE_ABI_VERSION;

fn message(err: WhetError) -> String {
    let ptr = whet_error_message(err);
    assert!(!ptr.is_null(), "error handle {err:#x} has no message");
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// The status and message of a failed call; frees the error.
fn failure(call: impl FnOnce(*mut WhetError) -> WhetStatus) -> (WhetStatus, String) {
    let mut err: WhetError = 0;
    let status = call(&mut err);
    assert_ne!(status, WhetStatus::Ok, "the call succeeded");
    assert_ne!(err, 0, "a failed call stores an error");
    let text = message(err);
    assert_eq!(whet_error_status(err), status);
    assert_eq!(whet_error_free(err), WhetStatus::Ok);
    (status, text)
}

fn ok(what: &str, call: impl FnOnce(*mut WhetError) -> WhetStatus) {
    let mut err: WhetError = 0;
    let status = call(&mut err);
    if status != WhetStatus::Ok {
        panic!("{what}: {status:?}: {}", message(err));
    }
}

/// A recipe over a small generated sentiment file (48 records) in `dir`.
fn recipe(dir: &std::path::Path) -> CString {
    let data = dir.join("data.jsonl");
    let lines: Vec<String> = (0..48)
        .map(|i| {
            let (text, label) = if i % 2 == 0 {
                (format!("a wonderful, great film number {i}"), 1)
            } else {
                (format!("a terrible, boring film number {i}"), 0)
            };
            serde_json::json!({"text": text, "label": label}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let recipe = format!(
        r#"
[model]
path = "asset:all-minilm-l6-v2"
task = "classification"
[data]
train = ["{}"]
validation_ratio = 0.25
max_seq_len = 16
[method]
kind = "lora"
r = 4
target_modules = ["query", "value"]
modules_to_save = ["classifier"]
[training]
batch_size = 8
epochs = 2
learning_rate = 1e-3
[output]
dir = "{}"
"#,
        data.display(),
        dir.join("out").display()
    );
    CString::new(recipe).unwrap()
}

fn create(recipe: &CStr) -> WhetSession {
    let mut session: WhetSession = 0;
    ok("create", |e| unsafe {
        whet_session_create(WHETSTONE_ABI_VERSION, recipe.as_ptr(), &mut session, e)
    });
    assert_ne!(session, 0);
    session
}

#[test]
fn null_and_non_utf8_arguments_are_refused_by_name() {
    let mut session: WhetSession = 0;
    let (status, text) =
        failure(|e| unsafe { whet_session_create(WHETSTONE_ABI_VERSION, null(), &mut session, e) });
    assert_eq!(status, WhetStatus::InvalidArgument);
    assert!(text.contains("recipe is NULL"), "{text}");

    let bad = [0x5b_u8, 0xff, 0xfe, 0];
    let (status, text) = failure(|e| unsafe {
        whet_session_create(
            WHETSTONE_ABI_VERSION,
            bad.as_ptr() as *const c_char,
            &mut session,
            e,
        )
    });
    assert_eq!(status, WhetStatus::InvalidArgument);
    assert!(text.contains("not valid UTF-8"), "{text}");

    let recipe = c"[model]\npath = \"x\"";
    let (status, text) = failure(|e| unsafe {
        whet_session_create(WHETSTONE_ABI_VERSION, recipe.as_ptr(), null_mut(), e)
    });
    assert_eq!(status, WhetStatus::InvalidArgument);
    assert!(text.contains("out_session is NULL"), "{text}");

    // A NULL `err` is allowed: the status alone reports the failure, nothing is stored.
    let status =
        unsafe { whet_session_create(WHETSTONE_ABI_VERSION, null(), &mut session, null_mut()) };
    assert_eq!(status, WhetStatus::InvalidArgument);
    assert_eq!(session, 0, "no handle on failure");
}

#[test]
fn a_program_built_against_another_header_is_refused() {
    let mut session: WhetSession = 0;
    let (status, text) = failure(|e| unsafe {
        whet_session_create(WHETSTONE_ABI_VERSION + 1, c"".as_ptr(), &mut session, e)
    });
    assert_eq!(status, WhetStatus::VersionMismatch);
    assert!(
        text.contains(&format!("ABI version {}", WHETSTONE_ABI_VERSION + 1))
            && text.contains(&format!("library is ABI version {WHETSTONE_ABI_VERSION}")),
        "{text}"
    );
}

#[test]
fn invalid_recipes_and_missing_plugins_are_config_errors_that_say_why() {
    let mut session: WhetSession = 0;
    let (status, text) = failure(|e| unsafe {
        whet_session_create(
            WHETSTONE_ABI_VERSION,
            c"[model]\npath = ".as_ptr(),
            &mut session,
            e,
        )
    });
    assert_eq!(status, WhetStatus::Config);
    assert!(text.contains("invalid recipe (TOML)"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let good = recipe(dir.path()).into_string().unwrap();
    let unknown =
        CString::new(good.replace("[training]", "[training]\nlearning_rat = 1.0")).unwrap();
    let (status, text) = failure(|e| unsafe {
        whet_session_create(WHETSTONE_ABI_VERSION, unknown.as_ptr(), &mut session, e)
    });
    assert_eq!(status, WhetStatus::Config);
    assert!(text.contains("learning_rat"), "{text}");

    let missing =
        CString::new(good.replace("kind = \"lora\"", "kind = \"no-such-method\"")).unwrap();
    let (status, text) = failure(|e| unsafe {
        whet_session_create(WHETSTONE_ABI_VERSION, missing.as_ptr(), &mut session, e)
    });
    assert!(
        matches!(status, WhetStatus::Config | WhetStatus::Plugin),
        "{status:?}"
    );
    assert!(text.contains("no-such-method"), "{text}");

    // A wrong plugin path in the recipe.
    let wrong_path = CString::new(format!("plugins = [\"/no/such/plugin.toml\"]\n{good}")).unwrap();
    let (status, text) = failure(|e| unsafe {
        whet_session_create(WHETSTONE_ABI_VERSION, wrong_path.as_ptr(), &mut session, e)
    });
    assert!(
        matches!(status, WhetStatus::Config | WhetStatus::Io),
        "{status:?}"
    );
    assert!(text.contains("/no/such/plugin.toml"), "{text}");

    let (status, text) = failure(|e| unsafe {
        whet_session_create_from_parts(
            WHETSTONE_ABI_VERSION,
            c"/no/such/model".as_ptr(),
            null(),
            null(),
            &mut session,
            e,
        )
    });
    assert_eq!(status, WhetStatus::Config);
    assert!(text.contains("/no/such/model"), "{text}");
    assert_eq!(session, 0);
}

#[test]
fn dead_forged_and_foreign_handles_are_errors() {
    let mut report = WhetEvalReport {
        loss: 0.0,
        accuracy: 0.0,
        perplexity: 0.0,
        examples: 0,
    };
    for handle in [0u64, 0xdead_beef, u64::MAX] {
        let (status, text) = failure(|e| unsafe { whet_session_evaluate(handle, &mut report, e) });
        assert_eq!(status, WhetStatus::InvalidHandle, "{handle:#x}");
        assert!(text.contains("not a live session"), "{text}");
        assert_eq!(whet_session_cancel(handle), WhetStatus::InvalidHandle);
    }

    // An error handle is not a session handle, and vice versa.
    let mut err: WhetError = 0;
    unsafe { whet_session_evaluate(0, &mut report, &mut err) };
    assert_eq!(
        unsafe { whet_session_evaluate(err, &mut report, null_mut()) },
        WhetStatus::InvalidHandle
    );
    assert_eq!(whet_session_free(err), WhetStatus::InvalidHandle);
    assert_eq!(whet_text_free(err), WhetStatus::InvalidHandle);
    // Errors free once.
    assert_eq!(whet_error_free(err), WhetStatus::Ok);
    assert_eq!(whet_error_free(err), WhetStatus::InvalidHandle);
    assert!(whet_error_message(err).is_null());
    assert_eq!(whet_error_status(err), WhetStatus::InvalidHandle);
    assert_eq!(
        unsafe { CStr::from_ptr(whet_status_name(WhetStatus::Busy as i32)) },
        c"WHET_STATUS_BUSY"
    );
    assert_eq!(
        unsafe { CStr::from_ptr(whet_status_name(99)) },
        c"WHET_STATUS_UNKNOWN"
    );
}

#[test]
fn a_freed_session_is_stale_and_frees_once() {
    let dir = tempfile::tempdir().unwrap();
    let session = create(&recipe(dir.path()));
    // Wrong inputs on a live session.
    let mut out = [0f32; 4];
    let texts = [c"short".as_ptr()];
    let (status, text) = failure(|e| unsafe {
        whet_session_embed(
            session,
            texts.as_ptr(),
            1,
            1,
            out.as_mut_ptr(),
            out.len(),
            e,
        )
    });
    assert_eq!(status, WhetStatus::BufferTooSmall);
    assert!(text.contains("need 384"), "{text}");
    let mut generated: WhetText = 0;
    let (status, text) = failure(|e| unsafe {
        whet_session_generate(session, c"hello".as_ptr(), null(), &mut generated, e)
    });
    assert_eq!(status, WhetStatus::Config);
    assert!(text.contains("not a causal language model"), "{text}");
    let (status, text) =
        failure(|e| unsafe { whet_session_set_adapter(session, c"nothing-loaded".as_ptr(), e) });
    assert_eq!(status, WhetStatus::Config);
    assert!(text.contains("no adapter named `nothing-loaded`"), "{text}");
    let (status, text) = failure(|e| unsafe {
        whet_session_configure(session, c"{\"model\": {\"path\": \"x\"}}".as_ptr(), e)
    });
    assert_eq!(status, WhetStatus::Config);
    assert!(text.contains("cannot change in an open session"), "{text}");

    assert_eq!(whet_session_free(session), WhetStatus::Ok);
    assert_eq!(whet_session_free(session), WhetStatus::InvalidHandle);
    let (status, _) = failure(|e| unsafe { whet_session_save_adapter(session, c"x".as_ptr(), e) });
    assert_eq!(status, WhetStatus::InvalidHandle);
}

/// What the progress callback of the cancellation test records.
struct Probe {
    session: WhetSession,
    steps: Vec<u64>,
    busy_status: Option<WhetStatus>,
}

unsafe extern "C" fn on_progress(progress: *const WhetProgress, user_data: *mut c_void) -> i32 {
    let probe = unsafe { &mut *(user_data as *mut Probe) };
    let step = unsafe { (*progress).step };
    probe.steps.push(step);
    if step == 1 {
        // Calling into the session that is training is refused, not a deadlock.
        let mut report = WhetEvalReport {
            loss: 0.0,
            accuracy: 0.0,
            perplexity: 0.0,
            examples: 0,
        };
        let mut err: WhetError = 0;
        probe.busy_status =
            Some(unsafe { whet_session_evaluate(probe.session, &mut report, &mut err) });
        whet_error_free(err);
    }
    if step == 2 {
        // Cancelling works from anywhere, also from inside the callback.
        whet_session_cancel(probe.session);
    }
    0
}

#[test]
fn training_is_cancelled_and_continues_and_a_busy_session_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let session = create(&recipe(dir.path()));
    let mut probe = Probe {
        session,
        steps: Vec::new(),
        busy_status: None,
    };
    let mut report = std::mem::MaybeUninit::<WhetTrainReport>::uninit();
    let status = unsafe {
        whet_session_train(
            session,
            0,
            Some(on_progress),
            &mut probe as *mut Probe as *mut c_void,
            report.as_mut_ptr(),
            null_mut(),
        )
    };
    assert_eq!(status, WhetStatus::Cancelled);
    let report = unsafe { report.assume_init() };
    assert_eq!((report.step, report.finished), (2, 0));
    assert_eq!(
        report.total_steps, 10,
        "2 epochs of 36 examples in batches of 8"
    );
    assert_eq!(probe.steps, [1, 2]);
    assert_eq!(probe.busy_status, Some(WhetStatus::Busy));

    // The run continues where it stopped: one step, then to the end.
    let mut report = std::mem::MaybeUninit::<WhetTrainReport>::uninit();
    ok("continue", |e| unsafe {
        whet_session_train(session, 1, None, null_mut(), report.as_mut_ptr(), e)
    });
    let report = unsafe { report.assume_init() };
    assert_eq!((report.step, report.finished), (3, 0));
    let mut report = std::mem::MaybeUninit::<WhetTrainReport>::uninit();
    ok("finish", |e| unsafe {
        whet_session_train(session, 0, None, null_mut(), report.as_mut_ptr(), e)
    });
    let report = unsafe { report.assume_init() };
    assert_eq!((report.step, report.finished), (10, 1));
    assert!(report.eval_accuracy.is_finite());
    assert_eq!(whet_session_free(session), WhetStatus::Ok);
}
