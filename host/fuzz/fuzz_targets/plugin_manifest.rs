//! Fuzz target `plugin_manifest`: see [`whetstone_host::fuzzing::plugin_manifest`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| whetstone_host::fuzzing::plugin_manifest(data));
