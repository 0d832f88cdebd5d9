//! Path normalisation never panics, and its result is normal: starts with `/`, has no dot
//! segment and no empty one, and normalising it again changes nothing.
#![no_main]
use fanout::config::EncodedSlashes;
use fanout::edge::path::normalize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for policy in [EncodedSlashes::Reject, EncodedSlashes::Keep, EncodedSlashes::Decode] {
        if let Ok(Some(normal)) = normalize(text, policy) {
            assert!(normal.starts_with('/'), "{normal}");
            for seg in normal[1..].split('/').rev().skip(1) {
                assert!(!seg.is_empty() && seg != "." && seg != "..", "{normal}");
            }
            assert_eq!(normalize(&normal, policy), Ok(None), "{normal}");
        }
    }
});
