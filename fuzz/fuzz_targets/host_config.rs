//! The host config file through `Config::load_with_table`, its TOML parse and validation. vmhostd is
//! a binary, so its config.rs (which needs nothing else of vmhostd) is compiled in here.
#![no_main]

#[allow(dead_code)]
#[path = "../../daemons/vmhostd/src/config.rs"]
mod config;

#[allow(dead_code, unused_imports)]
#[path = "../../daemons/vmhostd/src/config_fuzz.rs"]
mod config_fuzz;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // `Config::load_with_table` refuses a file that is not UTF-8 before parsing it.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = config_fuzz::check(text);
    }
});
