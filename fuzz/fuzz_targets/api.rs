//! An API body: an enroll request validated and trial-rendered with every artifact of its profile, or an update request (provision::fuzz::api).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| provision::fuzz::api(data));
