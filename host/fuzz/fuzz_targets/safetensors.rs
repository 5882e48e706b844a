//! Fuzz target `safetensors`: see [`whetstone_host::fuzzing::safetensors`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| whetstone_host::fuzzing::safetensors(data));
