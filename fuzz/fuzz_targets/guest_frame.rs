//! The host-guest stream: frames, then either side's messages.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../guest/protocol/tests/fuzz.rs"]
mod loops;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The first byte sets the size of the reads the stream arrives in.
    if let Some((&cut, stream)) = data.split_first() {
        loops::decode_stream(stream, &[usize::from(cut).max(1)]);
    }
});
