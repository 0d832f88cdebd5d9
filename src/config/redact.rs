//! The configuration as `GET /config` shows it: the file's text as JSON with every secret
//! replaced by `[redacted]`.

use serde_json::{json, Value};

/// A configuration file's text as JSON, secrets replaced by `[redacted]`: values of keys
/// that name a password, secret or token, and passwords inside URLs.
pub fn redacted(text: &str) -> Value {
    redact(serde_yaml::from_str(text).unwrap_or(Value::Null))
}

fn redact(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let lower = k.to_ascii_lowercase();
                    let secret = ["password", "secret", "token"]
                        .iter()
                        .any(|s| lower == *s || lower.ends_with(&format!("_{s}")));
                    let v = if secret && !v.is_object() && !v.is_array() {
                        json!("[redacted]")
                    } else {
                        redact(v)
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(list) => Value::Array(list.into_iter().map(redact).collect()),
        Value::String(s) => Value::String(redact_url(&s)),
        other => other,
    }
}

/// `scheme://user:password@host...` → `scheme://user:[redacted]@host...`.
fn redact_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_string();
    };
    let rest = &s[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return s.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    if !userinfo.contains(':') {
        return s.to_string();
    }
    format!(
        "{}{user}:[redacted]{}",
        &s[..scheme_end + 3],
        &s[scheme_end + 3 + at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_and_secret_keys_are_redacted() {
        assert_eq!(
            redact_url("redis://:hunter2@10.0.0.1:6379/0"),
            "redis://:[redacted]@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("redis://app:pw@h:1"),
            "redis://app:[redacted]@h:1"
        );
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(redact_url("http://user@h/x@y"), "http://user@h/x@y");
        let v = redact(
            json!({"redis": {"url": ["redis://:p@a:1"], "password": "x"},
            "admin": {"token_file": "/etc/t"}, "jwt": {"secret": "s", "client_secret": "c"}}),
        );
        assert_eq!(v["redis"]["url"][0], "redis://:[redacted]@a:1");
        assert_eq!(v["redis"]["password"], "[redacted]");
        assert_eq!(v["jwt"]["secret"], "[redacted]");
        assert_eq!(v["jwt"]["client_secret"], "[redacted]");
        assert_eq!(v["admin"]["token_file"], "/etc/t");
    }
}
