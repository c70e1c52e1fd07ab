//! A DHCP packet through validate → classify → boot target → reply (provision::fuzz::dhcp).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| provision::fuzz::dhcp(data));
