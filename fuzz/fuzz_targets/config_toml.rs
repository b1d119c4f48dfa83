//! Arbitrary text as config.toml: parsing returns a config or an error naming where it went wrong,
//! and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = banger_config::Config::parse(text, std::path::Path::new("config.toml"));
    }
});
