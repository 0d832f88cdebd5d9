//! `compress:` of a route: its codings in order of preference, the smallest answer worth
//! compressing, and the media types that are.

use super::*;

pub(super) fn build_compress(ck: &mut Checker, path: &str, f: FileCompress) -> CompressConfig {
    let mut algorithms = Vec::new();
    match f.algorithms {
        None => algorithms.extend(Coding::ALL),
        Some(names) => {
            for (i, name) in names.iter().enumerate() {
                let coding = Coding::ALL
                    .into_iter()
                    .find(|c| c.token() == name.trim().to_ascii_lowercase());
                match coding {
                    Some(c) if !algorithms.contains(&c) => algorithms.push(c),
                    Some(_) => ck.err(
                        &format!("{path}.algorithms[{i}]"),
                        format!("{name:?} is listed twice"),
                    ),
                    None => ck.err(
                        &format!("{path}.algorithms[{i}]"),
                        format!("{name:?} is not one of zstd, br, gzip"),
                    ),
                }
            }
            if names.is_empty() {
                ck.err(
                    &format!("{path}.algorithms"),
                    "needs at least one of zstd, br, gzip",
                );
            }
        }
    }
    let types = match f.types {
        None => DEFAULT_COMPRESS_TYPES
            .iter()
            .map(|t| t.to_string())
            .collect(),
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let t = t.trim().to_ascii_lowercase();
                let ok = t.split_once('/').is_some_and(|(a, b)| {
                    !a.is_empty() && !b.is_empty() && a != "*" && !t.contains(';')
                });
                if ok {
                    Some(t)
                } else {
                    ck.err(
                        &format!("{path}.types[{i}]"),
                        format!("{t:?} is not a media type such as text/* or application/json"),
                    );
                    None
                }
            })
            .collect(),
    };
    CompressConfig {
        algorithms,
        min_size: f.min_size.map_or(DEFAULT_COMPRESS_MIN_SIZE, |s| s.0),
        types,
    }
}
