//! Configuration loading: any text either loads or fails with an error naming what is wrong.
#![no_main]

use gatehouse::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(e) = Config::from_yaml(text) {
        assert!(!e.to_string().is_empty());
    }
});
