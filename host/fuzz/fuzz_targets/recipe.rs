//! Fuzz target `recipe`: see [`whetstone_host::fuzzing::recipe`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| whetstone_host::fuzzing::recipe(data));
