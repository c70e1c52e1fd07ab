//! A TFTP request through parse → resolve beneath the roots → option negotiation (provision::fuzz::tftp).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| provision::fuzz::tftp(data));
