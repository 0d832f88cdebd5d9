//! `-t`'s messages in words a user acts on: serde's and the YAML scanner's own messages
//! name Rust types (`expected u32`, `struct FileUpstream`) and offer no "did you mean"; they
//! are rewritten here, and a misspelt key, value or upstream name gets the nearest one.

/// The closest of `candidates` to `word`, if it is close enough to be a likely misspelling.
pub(crate) fn nearest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .into_iter()
        .map(|c| {
            (
                distance(&word.to_ascii_lowercase(), &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, by characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The names between backticks in serde's "expected one of `a`, `b`".
fn listed(expected: &str) -> Vec<&str> {
    expected.split('`').skip(1).step_by(2).collect()
}

/// `word` and, if one is near, "did you mean" it.
fn with_suggestion(text: String, word: &str, options: &[&str]) -> String {
    match nearest(word, options.iter().copied()) {
        Some(near) => format!("{text}; did you mean `{near}`?"),
        None => text,
    }
}

/// A Rust type name in an "expected ..." as a user would say it.
fn kind(expected: &str) -> String {
    let e = expected.trim();
    let words = match e {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a sequence" => "a list ([a, b] or lines starting with -)",
        "a map" => "a mapping (key: value)",
        "a string" => "a string",
        _ if e.starts_with("struct ") => "a mapping (key: value)",
        _ => return e.to_string(),
    };
    words.to_string()
}

/// What serde found, as a user would say it: `string "abc"` → `"abc"`.
fn found(unexpected: &str) -> String {
    let u = unexpected.trim();
    for (prefix, say) in [
        ("string ", ""),
        ("integer ", ""),
        ("floating point ", ""),
        ("boolean ", ""),
    ] {
        if let Some(rest) = u.strip_prefix(prefix) {
            return format!("{say}{}", rest.trim_matches('`'));
        }
    }
    match u {
        "sequence" => "a list".into(),
        "map" => "a mapping".into(),
        "unit value" => "nothing (null)".into(),
        other => other.into(),
    }
}

/// Rewrites one of serde's messages in words.
pub(crate) fn in_words(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some((name, expected)) = rest.split_once("`, expected ") {
            let options = listed(expected);
            if options.is_empty() {
                return format!("`{name}` is not a value this key takes");
            }
            let text = format!("`{name}` is not one of {}", options.join(", "));
            return with_suggestion(text, name, &options);
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((name, expected)) = rest.split_once("`, expected ") {
            let options = listed(expected);
            let text = match options.is_empty() {
                true => format!("unknown key `{name}`: this section takes no keys"),
                false => format!(
                    "unknown key `{name}`, expected one of {}",
                    options.join(", ")
                ),
            };
            return with_suggestion(text, name, &options);
        }
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((unexpected, expected)) = rest.split_once(", expected ") {
                return format!("expected {}, found {}", kind(expected), found(unexpected));
            }
        }
    }
    if let Some(name) = message
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        return format!("`{name}` is required here");
    }
    message.to_string()
}

/// The YAML scanner's message in words, given the text it read (a tab is the usual cause
/// of "cannot start any token").
pub(crate) fn yaml_in_words(
    message: &str,
    text: &str,
    line: Option<usize>,
    column: Option<usize>,
) -> String {
    let at = line
        .and_then(|l| text.lines().nth(l.saturating_sub(1)))
        .and_then(|l| l.chars().nth(column.unwrap_or(1).saturating_sub(1)));
    if message.contains("cannot start any token") && at == Some('\t') {
        return "a tab character: YAML indents with spaces, never tabs".into();
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_types_become_words() {
        assert_eq!(
            in_words("invalid type: string \"ten\", expected u32"),
            "expected a whole number (0 or more), found \"ten\""
        );
        assert_eq!(
            in_words("invalid type: sequence, expected struct FileUpstream"),
            "expected a mapping (key: value), found a list"
        );
        assert_eq!(
            in_words("invalid type: integer `5`, expected a boolean"),
            "expected true or false, found 5"
        );
        assert_eq!(
            in_words("missing field `backends`"),
            "`backends` is required here"
        );
    }

    #[test]
    fn misspellings_get_the_nearest_name() {
        assert_eq!(
            in_words("unknown variant `least_con`, expected one of `round_robin`, `weighted`, `least_conn`, `consistent_hash`"),
            "`least_con` is not one of round_robin, weighted, least_conn, consistent_hash; did you mean `least_conn`?"
        );
        assert_eq!(
            in_words("unknown field `backend`, expected one of `balance`, `backends`, `retries`"),
            "unknown key `backend`, expected one of balance, backends, retries; did you mean `backends`?"
        );
        // Nothing near: no guess.
        assert_eq!(
            in_words("unknown variant `fastest`, expected `h1` or `h2`"),
            "`fastest` is not one of h1, h2"
        );
        assert_eq!(nearest("shadwo", ["api", "shadow"]), Some("shadow"));
        assert_eq!(nearest("x", ["api", "shadow"]), None);
    }

    #[test]
    fn a_tab_is_named() {
        let text = "listen: 127.0.0.1:1\nupstreams:\n\tapi: {}\n";
        assert_eq!(
            yaml_in_words(
                "found character that cannot start any token",
                text,
                Some(3),
                Some(1)
            ),
            "a tab character: YAML indents with spaces, never tabs"
        );
    }
}
