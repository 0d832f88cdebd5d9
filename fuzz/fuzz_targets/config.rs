//! Any configuration text gets a verdict (a model or a list of problems), never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Backend host names would be resolved and token files read: the fuzzer keeps to
    // addresses and to the text itself.
    let b = text.as_bytes();
    let named_host = b
        .windows(3)
        .any(|w| w[0].is_ascii_alphabetic() && w[1] == b':' && w[2].is_ascii_digit());
    if named_host || text.contains("token_file") {
        return;
    }
    match fanout::config::from_yaml(text, "fuzz") {
        Ok(_) => {}
        Err(e) => assert!(!e.errors.is_empty()),
    }
});
