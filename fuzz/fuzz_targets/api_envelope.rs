//! A request line on the local socket, a peer's call, and a response line.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../daemons/api/tests/fuzz.rs"]
mod loops;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The daemon reads lines as UTF-8; anything else is refused before any decoder.
    if let Ok(line) = std::str::from_utf8(data) {
        loops::decode_all(line);
    }
});
