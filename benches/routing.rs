//! Routing lookup cost with 10,000 routes (`cargo bench --bench routing`). Prints the mean
//! nanoseconds per lookup for exact hits, deep prefix hits, host routes and misses; the
//! figures go in bench/RESULTS.md. Not a test: nothing here asserts a time.

use std::hint::black_box;
use std::time::Instant;

use fanout::config::from_yaml;
use fanout::routing::{RouteMatch, Router};
use http::Method;

fn main() {
    let mut yaml = String::from(
        "listen: 127.0.0.1:1\nupstreams:\n  u: { backends: [127.0.0.1:2] }\nroutes:\n",
    );
    for i in 0..10_000 {
        let line = match i % 4 {
            0 => format!("  - {{ match: {{ path: /svc{i}/items }}, upstream: u }}\n"),
            1 => format!("  - {{ match: {{ prefix: /svc{i}/api/v1 }}, upstream: u }}\n"),
            2 => format!("  - {{ match: {{ prefix: /svc{i} }}, upstream: u, name: r{i} }}\n"),
            _ => format!(
                "  - {{ match: {{ prefix: /svc{i}, host: h{i}.example.com }}, upstream: u }}\n"
            ),
        };
        yaml.push_str(&line);
    }
    let config = from_yaml(&yaml, "bench").expect("valid");
    let built = Instant::now();
    let router = Router::new(&config.routes);
    println!(
        "routes: {}  build: {:?}",
        config.routes.len(),
        built.elapsed()
    );

    let cases: [(&str, Option<&str>, &str); 4] = [
        ("exact", None, "/svc5000/items"),
        (
            "deep prefix",
            None,
            "/svc4001/api/v1/users/12345/orders?x=1",
        ),
        (
            "host prefix",
            Some("h7003.example.com"),
            "/svc7003/anything",
        ),
        (
            "miss",
            Some("nobody.example.com"),
            "/unknown/path/that/matches/nothing",
        ),
    ];
    for (name, host, path) in cases {
        let found = router.lookup(host, path, &Method::GET);
        assert!(
            name == "miss" || matches!(found, RouteMatch::Found(_)),
            "{name}: {found:?}"
        );
        let n = 2_000_000u32;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..n {
                black_box(router.lookup(black_box(host), black_box(path), &Method::GET));
            }
            best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
        }
        println!("{name:12} {best:6.1} ns/lookup (best of 5 × {n})");
    }
}
