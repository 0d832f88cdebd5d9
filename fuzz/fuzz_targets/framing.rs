//! The request framer never panics, and gives the same verdict however the bytes are split
//! and whether or not it takes runs of bytes at once.
#![no_main]
use fanout::edge::framing::{Framer, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_request_line: 256,
        max_header_bytes: 512,
        max_headers: 8,
    };
    let mut whole = Framer::new(limits);
    let one = whole.feed(data).map(|open| (open, whole.heads(), whole.phase()));
    let split = data.first().map_or(0, |b| *b as usize) % (data.len() + 1);
    let mut parts = Framer::new(limits);
    let two = parts
        .feed(&data[..split])
        .and_then(|_| parts.feed(&data[split..]))
        .map(|open| (open, parts.heads(), parts.phase()));
    assert_eq!(one, two);
    let mut reference = Framer::stepwise(limits);
    let three = reference
        .feed(data)
        .map(|open| (open, reference.heads(), reference.phase()));
    assert_eq!(one, three);
    if let Ok((open, _, _)) = one {
        assert!(open <= data.len());
    }
});
