//! A fleet peer's bytes on the QUIC endpoint: the frame header, the request or response
//! body, and the ALPN id of the handshake.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../gossip/tests/fuzz.rs"]
mod loops;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    loops::read_any(data);
    let _ = vmhost_gossip::quic::version_of_alpn(data);
});
