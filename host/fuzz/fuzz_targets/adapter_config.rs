//! Fuzz target `adapter_config`: see [`whetstone_host::fuzzing::adapter_config`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| whetstone_host::fuzzing::adapter_config(data));
