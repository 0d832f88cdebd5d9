//! W3C trace context: a client's `traceparent` goes on unchanged to the upstream and the
//! mirror copies; a request without a valid one gets a new trace that all its copies share;
//! the access log names the trace.

use std::time::Duration;

use crate::common::*;

const SENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn mirrored(primary: &Backend, shadow: &Backend) -> Gateway {
    Gateway::start(&format!(
        "upstreams:\n  main: {{ backends: [{}] }}\n  shadow: {{ backends: [{}] }}\n\
         routes:\n  - match: {{ prefix: / }}\n    upstream: main\n    mirror: [{{ upstream: shadow }}]\n",
        primary.addr, shadow.addr
    ))
}

/// The `traceparent` (and `tracestate`) the last request to `b` carried.
fn carried(b: &Backend) -> (Option<String>, Option<String>) {
    let seen = b.seen();
    let last = seen.last().expect("a request reached the backend");
    let get = |name: &str| {
        last.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    (get("traceparent"), get("tracestate"))
}

async fn mirrored_once(shadow: &Backend, count: usize) {
    eventually(Duration::from_secs(5), "the mirror copy", || async move {
        shadow.seen().len() >= count
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_traceparent_goes_on_unchanged_and_is_logged() {
    let (primary, shadow) = (Backend::start("p").await, Backend::start("s").await);
    let gw = mirrored(&primary, &shadow);
    let resp = client()
        .get(gw.url("/t"))
        .header("traceparent", SENT)
        .header("tracestate", "vendor=1")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        carried(&primary),
        (Some(SENT.to_string()), Some("vendor=1".to_string()))
    );
    mirrored_once(&shadow, 1).await;
    assert_eq!(carried(&shadow).0.as_deref(), Some(SENT));
    let line = stdout_line(&gw, "\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\"").await;
    assert!(line.contains("\"path\":\"/t\""), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_valid_one_gets_a_new_trace_shared_by_its_copies() {
    let (primary, shadow) = (Backend::start("p").await, Backend::start("s").await);
    let gw = mirrored(&primary, &shadow);
    let c = client();
    let mut traces = Vec::new();
    for (i, sent) in [
        None,
        Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = c
            .get(gw.url(&format!("/n{i}")))
            .header("tracestate", "orphan=1");
        if let Some(v) = sent {
            req = req.header("traceparent", v);
        }
        assert_eq!(req.send().await.expect("request").status(), 200);
        let (parent, state) = carried(&primary);
        let parent = parent.expect("a traceparent was created");
        assert_eq!(
            state, None,
            "a tracestate without its traceparent is dropped"
        );
        let fields: Vec<&str> = parent.split('-').collect();
        assert_eq!(fields.len(), 4, "{parent}");
        assert_eq!((fields[0], fields[3]), ("00", "00"), "{parent}");
        assert_eq!((fields[1].len(), fields[2].len()), (32, 16), "{parent}");
        assert!(
            fields[1]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{parent}"
        );
        assert_ne!(fields[1], "00000000000000000000000000000000");
        mirrored_once(&shadow, i + 1).await;
        assert_eq!(carried(&shadow).0.as_deref(), Some(parent.as_str()));
        let line = stdout_line(&gw, &format!("\"trace_id\":\"{}\"", fields[1])).await;
        assert!(line.contains(&format!("\"path\":\"/n{i}\"")), "{line}");
        traces.push(fields[1].to_string());
    }
    assert_ne!(traces[0], traces[1], "each request is its own trace");
}
