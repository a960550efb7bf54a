#![no_main]
// The body is sluice_fuzz_targets::control_stream (fuzz/targets), which the normal tests replay.
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz_targets::control_stream(data));
