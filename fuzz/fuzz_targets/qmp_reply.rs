//! A line from QEMU's monitor: an event or a reply, as the QMP client and the out-of-band
//! monitor read it.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../vmm/tests/fuzz.rs"]
mod loops;

libfuzzer_sys::fuzz_target!(|data: &[u8]| loops::decode_line(data));
