//! The configuration file: parsing and validation never panic, and an
//! accepted configuration passes validation.
#![no_main]
use hush::config::ServerConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(table) = ServerConfig::parse_file(text) else { return };
    if let Ok(config) = ServerConfig::from_layers(vec![("fuzz".into(), table)]) {
        assert!(config.validate().is_ok());
    }
});
