//! Fuzz target `gguf`: see [`whetstone_host::fuzzing::gguf`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| whetstone_host::fuzzing::gguf(data));
