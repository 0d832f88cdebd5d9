//! The mirror lanes' HTTP/1 answer reader never panics and finds (and reduces) the same
//! answers however the bytes arrive.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = fanout::mirror::lanes_read_all(data, data.len());
    let split = data.first().map_or(0, |b| *b as usize) % (data.len() + 1);
    assert_eq!(whole, fanout::mirror::lanes_read_all(data, split));
});
