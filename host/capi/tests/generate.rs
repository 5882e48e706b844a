//! Text generation through the C ABI on the real SmolLM2-135M-Instruct (the asset), as a
//! session from parts with no method: the text equals the host's own generation, sampling
//! options are honoured, and text handles free once. Needs `whet assets fetch`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CStr;
use std::ptr::null;

use whetstone::infer::*;
use whetstone::session::*;
use whetstone::status::*;
use whetstone::text::*;
use whetstone::WHETSTONE_ABI_VERSION;
use whetstone_host::model::generate::GenerateOptions;
use whetstone_host::session::Session;

fn generate(session: WhetSession, prompt: &CStr, options: Option<&WhetGenerateOptions>) -> String {
    let mut text: WhetText = 0;
    let mut err: WhetError = 0;
    let status = unsafe {
        whet_session_generate(
            session,
            prompt.as_ptr(),
            options.map_or(null(), |o| o as *const _),
            &mut text,
            &mut err,
        )
    };
    assert_eq!(status, WhetStatus::Ok, "{:?}", unsafe {
        CStr::from_ptr(whet_error_message(err))
    });
    let out = unsafe { CStr::from_ptr(whet_text_data(text)) }
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(whet_text_free(text), WhetStatus::Ok);
    assert_eq!(
        whet_text_free(text),
        WhetStatus::InvalidHandle,
        "frees once"
    );
    assert!(whet_text_data(text).is_null());
    out
}

#[test]
fn generation_through_the_c_abi_equals_the_hosts() {
    let mut session: WhetSession = 0;
    let status = unsafe {
        whet_session_create_from_parts(
            WHETSTONE_ABI_VERSION,
            c"asset:smollm2-135m-instruct".as_ptr(),
            null(),
            null(),
            &mut session,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(status, WhetStatus::Ok);
    let options = WhetGenerateOptions {
        max_new_tokens: 12,
        chat: 1,
        ..whet_generate_options_default()
    };
    let greedy = generate(session, c"What is the capital of France?", Some(&options));

    let host = Session::from_parts("asset:smollm2-135m-instruct", None, Vec::new()).unwrap();
    let expected = host
        .generate(
            "What is the capital of France?",
            &GenerateOptions {
                max_new_tokens: 12,
                chat: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(greedy, expected.text);
    assert!(greedy.contains("Paris"), "{greedy}");

    // Sampling: the same seed gives the same text; the defaults apply with NULL options.
    let sampled = WhetGenerateOptions {
        temperature: 1.0,
        top_p: 0.9,
        seed: 11,
        ..options
    };
    let a = generate(session, c"Once upon a time", Some(&sampled));
    let b = generate(session, c"Once upon a time", Some(&sampled));
    assert_eq!(a, b);
    assert!(!generate(session, c"Once upon a time", None).is_empty());

    let bad = WhetGenerateOptions {
        top_p: 0.0,
        ..options
    };
    let mut text: WhetText = 0;
    let mut err: WhetError = 0;
    let status =
        unsafe { whet_session_generate(session, c"x".as_ptr(), &bad, &mut text, &mut err) };
    assert_eq!(status, WhetStatus::InvalidArgument);
    let message = unsafe { CStr::from_ptr(whet_error_message(err)) };
    assert!(message.to_str().unwrap().contains("top_p"));
    whet_error_free(err);
    assert_eq!(whet_session_free(session), WhetStatus::Ok);
}
