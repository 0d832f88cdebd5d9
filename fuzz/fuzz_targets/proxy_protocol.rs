//! The PROXY protocol reader never panics, never takes more than one header's bytes off
//! the connection (what follows the header is left for HTTP), and what it took parses to
//! the same result again.
#![no_main]
use fanout::edge::proxy_protocol::{parse, read_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut rest = data;
    let result = rt.block_on(read_header(&mut rest));
    if let Ok(source) = result {
        let taken = &data[..data.len() - rest.len()];
        assert!(taken.len() <= 16 + 1024, "took {} bytes", taken.len());
        assert_eq!(parse(taken), Ok(source));
        // The header ends where the reader stopped: the same bytes with anything after
        // them read to the same place.
        let mut longer = taken.to_vec();
        longer.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let mut after = &longer[..];
        assert_eq!(rt.block_on(read_header(&mut after)), Ok(source));
        assert_eq!(after, b"GET / HTTP/1.1\r\n\r\n");
    }
});
