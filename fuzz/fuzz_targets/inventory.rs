//! An inventory file in YAML, TOML and CSV: parsed, written and read back (provision::fuzz::inventory).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| provision::fuzz::inventory(data));
