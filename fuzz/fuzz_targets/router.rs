//! The router, built from fuzzed routes, never panics on a fuzzed request, and what it
//! finds does match the request.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.lines();
    let request = lines.next().unwrap_or("/");
    let mut yaml = String::from("listen: 127.0.0.1:1\nupstreams:\n  u: { backends: [127.0.0.1:2] }\nroutes:\n");
    for (i, line) in lines.take(32).enumerate() {
        let (matcher, rest) = match line.strip_prefix('=') {
            Some(rest) => ("path", rest),
            None => ("prefix", line),
        };
        let value = serde_json_string(rest);
        yaml.push_str(&format!("  - {{ name: r{i}, match: {{ {matcher}: {value} }}, upstream: u }}\n"));
    }
    let Ok(config) = fanout::config::from_yaml(&yaml, "fuzz") else { return };
    let router = fanout::routing::Router::new(&config.routes);
    let found = router.lookup(None, request, &http::Method::GET);
    if let fanout::routing::RouteMatch::Found(id) = found {
        let route = &config.routes[id];
        match &route.path {
            fanout::config::PathMatch::Exact(p) => assert_eq!(p, request),
            fanout::config::PathMatch::Prefix(p) => assert!(request.starts_with(p.as_str())),
        }
    }
});

/// A YAML double-quoted scalar holding `s`.
fn serde_json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
