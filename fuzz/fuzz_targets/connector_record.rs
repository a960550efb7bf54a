#![no_main]
// The body is sluice_fuzz_targets::connector_record (fuzz/targets), which the normal tests replay.
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz_targets::connector_record(data));
