#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz_checks::canonical_path(data));
