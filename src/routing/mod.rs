//! Routing: from a request's host, path, method and fields to one configured route; and,
//! on a route with `split:`, which upstream a request goes to ([`split`]).
//!
//! Precedence: routes that name the request's `host` are tried before routes
//! without one (like nginx's server blocks); within each group an exact `path` beats any
//! `prefix`, and the longest prefix wins. `methods` restrict a route: a path that matches
//! only routes of other methods answers 405 rather than 404. Prefixes are plain byte
//! prefixes, as nginx's `location /api` and Envoy's `prefix`.
//!
//! `match.scheme`, `match.listener`, `match.headers`, `match.cookies` and `match.query`
//! narrow a route further: among the routes registered at one path, those with more
//! conditions are tried first, and a route whose conditions do not hold is passed over as
//! if absent (a shorter prefix may then match). Conditions are only looked at among the
//! few routes registered at the paths the request's path walks through, never over the
//! whole table.
//!
//! Lookup never scans the route list: exact paths sit in a hash map, prefixes in a byte
//! radix trie walked once along the path, so the cost grows with the path's length, not
//! with the number of routes (`bench/routing.rs` measures 10,000 routes).

pub(crate) mod split;

use std::collections::HashMap;

use http::{HeaderMap, Method};

use crate::config::{strip_port, Conditions, PathMatch, RouteConfig, RouteId, Scheme};
use crate::http::headers::{cookie, query_param};

/// What routing looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct Probe<'a> {
    /// The Host header or authority as sent.
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub method: &'a Method,
    pub scheme: Scheme,
    /// The `name:` of the listener the request came in on.
    pub listener: Option<&'a str>,
    /// The request's header fields, for `match.headers` and `match.cookies`.
    pub headers: Option<&'a HeaderMap>,
    /// The request's query, for `match.query`.
    pub query: Option<&'a str>,
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMatch {
    Found(RouteId),
    /// Some route matches the host and path, but none allows the method.
    MethodNotAllowed,
    NotFound,
}

#[derive(Debug)]
struct Entry {
    methods: Option<Vec<Method>>,
    conditions: Conditions,
    route: RouteId,
}

impl Entry {
    fn conditions_hold(&self, probe: &Probe) -> bool {
        let c = &self.conditions;
        let basic = c.scheme.is_none_or(|s| s == probe.scheme)
            && c.listener
                .as_deref()
                .is_none_or(|l| probe.listener == Some(l));
        if !basic || !c.reads_request() {
            return basic;
        }
        let headers = probe.headers;
        let header = |name: &str| headers?.get(name).map(|v| v.as_bytes());
        c.headers.iter().all(|(name, m)| m.holds(header(name)))
            && c.cookies
                .iter()
                .all(|(name, m)| m.holds(headers.and_then(|h| cookie(h, name))))
            && c.query.iter().all(|(name, m)| {
                m.holds(query_param(probe.query, name).as_deref().map(str::as_bytes))
            })
    }
}

/// Candidates registered at one path or prefix, in configuration order.
type Entries = Vec<Entry>;

#[derive(Debug, Default)]
struct Table {
    exact: HashMap<Box<str>, Entries>,
    prefix: RadixTrie<Entries>,
}

/// The routing table built once from the configuration.
#[derive(Debug, Default)]
pub struct Router {
    hosts: HashMap<Box<str>, Table>,
    any: Table,
    /// Some route names a listener: the proxy finds the request's listener only then.
    pub needs_listener: bool,
}

impl Router {
    pub fn new(routes: &[RouteConfig]) -> Router {
        let mut router = Router::default();
        for (id, r) in routes.iter().enumerate() {
            let table = match &r.host {
                Some(h) => router.hosts.entry(h.as_str().into()).or_default(),
                None => &mut router.any,
            };
            let entry = Entry {
                methods: r.methods.clone(),
                conditions: r.conditions.clone(),
                route: id,
            };
            router.needs_listener |= r.conditions.listener.is_some();
            let entries = match &r.path {
                PathMatch::Exact(p) => table.exact.entry(p.as_str().into()).or_default(),
                PathMatch::Prefix(p) => table.prefix.entry(p.as_bytes()),
            };
            entries.push(entry);
            // More conditions first; equal ones keep the file's order (a stable sort).
            entries.sort_by_key(|e| std::cmp::Reverse(e.conditions.count()));
        }
        router
    }

    /// Finds the route for a plain HTTP request on an unnamed listener. `host` is the
    /// Host header or authority as sent.
    pub fn lookup(&self, host: Option<&str>, path: &str, method: &Method) -> RouteMatch {
        self.find(&Probe {
            host,
            path,
            method,
            scheme: Scheme::Http,
            listener: None,
            headers: None,
            query: None,
        })
    }

    /// Finds the route for a request.
    pub fn find(&self, probe: &Probe) -> RouteMatch {
        let mut method_mismatch = false;
        if !self.hosts.is_empty() {
            if let Some(table) = probe.host.and_then(|h| self.host_table(h)) {
                match table.lookup(probe) {
                    RouteMatch::Found(id) => return RouteMatch::Found(id),
                    RouteMatch::MethodNotAllowed => method_mismatch = true,
                    RouteMatch::NotFound => {}
                }
            }
        }
        match self.any.lookup(probe) {
            RouteMatch::NotFound if method_mismatch => RouteMatch::MethodNotAllowed,
            found => found,
        }
    }

    fn host_table(&self, host: &str) -> Option<&Table> {
        let name = strip_port(host);
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(name.to_ascii_lowercase().as_str())
        } else {
            self.hosts.get(name)
        }
    }
}

impl Table {
    fn lookup(&self, probe: &Probe) -> RouteMatch {
        let mut mismatch = false;
        if let Some(entries) = self.exact.get(probe.path) {
            match pick(entries, probe) {
                Some(Some(id)) => return RouteMatch::Found(id),
                Some(None) => mismatch = true,
                None => {}
            }
        }
        // Walk from the shortest to the longest matching prefix; the last accepted wins.
        let mut best = None;
        self.prefix.walk(probe.path.as_bytes(), |entries| {
            match pick(entries, probe) {
                Some(Some(id)) => best = Some(id),
                Some(None) => mismatch = true,
                None => {}
            }
        });
        match best {
            Some(id) => RouteMatch::Found(id),
            None if mismatch => RouteMatch::MethodNotAllowed,
            None => RouteMatch::NotFound,
        }
    }
}

/// The first entry whose conditions and method hold. `Some(None)`: some entry's conditions
/// hold but none allows the method; `None`: no entry's conditions hold (as if absent).
fn pick(entries: &Entries, probe: &Probe) -> Option<Option<RouteId>> {
    let mut applies = entries
        .iter()
        .filter(|e| e.conditions_hold(probe))
        .peekable();
    applies.peek()?;
    Some(
        applies
            .find(|e| {
                e.methods
                    .as_ref()
                    .is_none_or(|ms| ms.contains(probe.method))
            })
            .map(|e| e.route),
    )
}

/// A radix (compressed) trie over bytes; children sorted by their first byte.
#[derive(Debug)]
struct RadixTrie<T> {
    root: Node<T>,
}

impl<T> Default for RadixTrie<T> {
    fn default() -> Self {
        RadixTrie {
            root: Node {
                label: Box::default(),
                value: None,
                children: Vec::new(),
            },
        }
    }
}

#[derive(Debug)]
struct Node<T> {
    label: Box<[u8]>,
    value: Option<T>,
    children: Vec<Node<T>>,
}

impl<T: Default> RadixTrie<T> {
    /// The value slot for `key`, created empty if absent.
    fn entry(&mut self, key: &[u8]) -> &mut T {
        self.root.entry(key)
    }
}

impl<T> RadixTrie<T> {
    /// Calls `f` with the value of every stored key that is a prefix of `key`, shortest first.
    fn walk(&self, key: &[u8], mut f: impl FnMut(&T)) {
        let mut node = &self.root;
        let mut rest = key;
        loop {
            if let Some(v) = &node.value {
                f(v);
            }
            let Some(&first) = rest.first() else { return };
            let Ok(i) = node.children.binary_search_by_key(&first, |c| c.label[0]) else {
                return;
            };
            let child = &node.children[i];
            if !rest.starts_with(&child.label) {
                return;
            }
            rest = &rest[child.label.len()..];
            node = child;
        }
    }
}

impl<T: Default> Node<T> {
    fn entry(&mut self, key: &[u8]) -> &mut T {
        let Some(&first) = key.first() else {
            return self.value.get_or_insert_with(T::default);
        };
        match self.children.binary_search_by_key(&first, |c| c.label[0]) {
            Err(at) => {
                self.children.insert(
                    at,
                    Node {
                        label: key.into(),
                        value: None,
                        children: Vec::new(),
                    },
                );
                self.children[at].value.get_or_insert_with(T::default)
            }
            Ok(i) => {
                let child = &mut self.children[i];
                let common = child
                    .label
                    .iter()
                    .zip(key)
                    .take_while(|(a, b)| a == b)
                    .count();
                if common < child.label.len() {
                    // Split: the child keeps its tail under a new node holding the shared part.
                    let tail = Node {
                        label: child.label[common..].into(),
                        value: child.value.take(),
                        children: std::mem::take(&mut child.children),
                    };
                    child.label = key[..common].into();
                    child.children = vec![tail];
                }
                child.entry(&key[common..])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_yaml;

    fn router(routes: &str) -> (Router, Vec<String>) {
        let text = format!(
            "listen: 127.0.0.1:1\nupstreams:\n  u: {{ backends: [127.0.0.1:2] }}\nroutes:\n{routes}"
        );
        let config = from_yaml(&text, "test").expect("valid config");
        let labels = config.routes.iter().map(|r| r.label.clone()).collect();
        (Router::new(&config.routes), labels)
    }

    fn find(r: &(Router, Vec<String>), host: Option<&str>, path: &str, method: Method) -> String {
        match r.0.lookup(host, path, &method) {
            RouteMatch::Found(id) => r.1[id].clone(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn exact_beats_prefix_and_longest_prefix_wins() {
        let r = router(
            "  - { match: { prefix: / }, upstream: u }\n\
             \x20 - { match: { prefix: /api }, upstream: u }\n\
             \x20 - { match: { prefix: /api/v2 }, upstream: u }\n\
             \x20 - { match: { path: /api/v2/exact }, upstream: u }\n",
        );
        assert_eq!(
            find(&r, None, "/api/v2/exact", Method::GET),
            "path:/api/v2/exact"
        );
        assert_eq!(
            find(&r, None, "/api/v2/exact/more", Method::GET),
            "prefix:/api/v2"
        );
        assert_eq!(find(&r, None, "/api/v1", Method::GET), "prefix:/api");
        assert_eq!(find(&r, None, "/apix", Method::GET), "prefix:/api");
        assert_eq!(find(&r, None, "/ap", Method::GET), "prefix:/");
        assert_eq!(find(&r, None, "/", Method::GET), "prefix:/");
    }

    #[test]
    fn host_routes_beat_hostless_ones() {
        let r = router(
            "  - { name: any, match: { path: /x }, upstream: u }\n\
             \x20 - { name: host, match: { prefix: /, host: API.example.com }, upstream: u }\n",
        );
        assert_eq!(find(&r, Some("api.example.com"), "/x", Method::GET), "host");
        assert_eq!(
            find(&r, Some("Api.Example.com:8080"), "/x", Method::GET),
            "host"
        );
        assert_eq!(
            find(&r, Some("other.example.com"), "/x", Method::GET),
            "any"
        );
        assert_eq!(find(&r, None, "/x", Method::GET), "any");
        assert_eq!(find(&r, Some("other"), "/y", Method::GET), "NotFound");
    }

    #[test]
    fn methods_restrict_and_fall_through() {
        let r = router(
            "  - { name: get, match: { prefix: /a, methods: [GET] }, upstream: u }\n\
             \x20 - { name: post, match: { prefix: /a, methods: [post] }, upstream: u }\n\
             \x20 - { name: short, match: { prefix: /, methods: [DELETE] }, upstream: u }\n\
             \x20 - { name: only-put, match: { path: /p, methods: [PUT] }, upstream: u }\n",
        );
        assert_eq!(find(&r, None, "/a", Method::GET), "get");
        assert_eq!(find(&r, None, "/a", Method::POST), "post");
        assert_eq!(find(&r, None, "/a", Method::DELETE), "short");
        assert_eq!(find(&r, None, "/p", Method::GET), "MethodNotAllowed");
        assert_eq!(find(&r, None, "/a", Method::PATCH), "MethodNotAllowed");
    }

    #[test]
    fn scheme_and_listener_conditions_narrow_a_path() {
        let text = "listen:\n  - { address: 127.0.0.1:1, name: public }\n  - { address: 127.0.0.1:3, name: internal }\n\
            upstreams:\n  u: { backends: [127.0.0.1:2] }\nroutes:\n\
            \x20 - { name: plain, match: { prefix: /, scheme: http }, redirect: { to: \"https://{host}{path}\" } }\n\
            \x20 - { name: any, match: { prefix: / }, upstream: u }\n\
            \x20 - { name: inside, match: { prefix: /admin, listener: internal }, upstream: u }\n";
        let config = from_yaml(text, "test").expect("valid config");
        let router = Router::new(&config.routes);
        let label = |scheme, listener, path| match router.find(&Probe {
            host: None,
            path,
            method: &Method::GET,
            scheme,
            listener,
            headers: None,
            query: None,
        }) {
            RouteMatch::Found(id) => config.routes[id].label.clone(),
            other => format!("{other:?}"),
        };
        assert_eq!(label(Scheme::Http, Some("public"), "/x"), "plain");
        assert_eq!(label(Scheme::Https, Some("public"), "/x"), "any");
        assert_eq!(label(Scheme::Https, Some("internal"), "/admin/x"), "inside");
        // Not on its listener: the route is passed over, a shorter prefix answers.
        assert_eq!(label(Scheme::Https, Some("public"), "/admin/x"), "any");
        assert!(router.needs_listener);
    }

    #[test]
    fn header_cookie_and_query_conditions_narrow_a_path_and_more_of_them_win() {
        let text = "listen: 127.0.0.1:1\nupstreams:\n  u: { backends: [127.0.0.1:2] }\nroutes:\n\
            \x20 - { name: all, match: { prefix: /api }, upstream: u }\n\
            \x20 - { name: canary, match: { prefix: /api, headers: { X-Canary: \"1\" } }, upstream: u }\n\
            \x20 - { name: beta, match: { prefix: /api, cookies: { beta: \"~^(on|1)$\" } }, upstream: u }\n\
            \x20 - { name: both, match: { prefix: /api, headers: { x-canary: \"*\" }, query: { v: \"2 x\" } }, upstream: u }\n";
        let config = from_yaml(text, "test").expect("valid config");
        let router = Router::new(&config.routes);
        let label = |fields: &[(&str, &str)], query: Option<&str>| {
            let mut headers = HeaderMap::new();
            for (name, value) in fields {
                headers.append(
                    http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                    http::HeaderValue::from_str(value).expect("value"),
                );
            }
            match router.find(&Probe {
                host: None,
                path: "/api/x",
                method: &Method::GET,
                scheme: Scheme::Http,
                listener: None,
                headers: Some(&headers),
                query,
            }) {
                RouteMatch::Found(id) => config.routes[id].label.clone(),
                other => format!("{other:?}"),
            }
        };
        assert_eq!(label(&[], None), "all");
        assert_eq!(label(&[("x-canary", "1")], None), "canary");
        assert_eq!(label(&[("x-canary", "2")], None), "all");
        assert_eq!(label(&[("cookie", "a=b; beta=on")], None), "beta");
        // Over two fields, as HTTP/2 sends them; a value that only starts alike is not one.
        assert_eq!(
            label(&[("cookie", "a=b"), ("cookie", "beta=1")], None),
            "beta"
        );
        assert_eq!(label(&[("cookie", "beta=only")], None), "all");
        assert_eq!(label(&[("cookie", "nobeta=on")], None), "all");
        // Two conditions beat one; the query value is compared decoded.
        assert_eq!(label(&[("x-canary", "1")], Some("v=2+x")), "both");
        assert_eq!(label(&[("x-canary", "1")], Some("v=2%20x")), "both");
        assert_eq!(label(&[("x-canary", "1")], Some("v=3")), "canary");
    }

    #[test]
    fn trie_splits_and_shares_prefixes() {
        let mut t: RadixTrie<Vec<u32>> = RadixTrie::default();
        for (i, k) in ["/abc", "/abd", "/a", "/abcdef", "/b", ""]
            .iter()
            .enumerate()
        {
            t.entry(k.as_bytes()).push(i as u32);
        }
        let mut seen: Vec<u32> = Vec::new();
        t.walk(b"/abcdefg", |v| seen.extend(v));
        assert_eq!(seen, vec![5, 2, 0, 3]);
        seen.clear();
        t.walk(b"/abd", |v| seen.extend(v));
        assert_eq!(seen, vec![5, 2, 1]);
        seen.clear();
        t.walk(b"/c", |v| seen.extend(v));
        assert_eq!(seen, vec![5]);
    }
}
