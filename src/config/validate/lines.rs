//! Where in the file each problem is: a key path turned into a line number for `-t`.

use super::*;

/// Finds the line of each error's key path in block-style YAML, where it can be found.
pub(in crate::config) fn attach_lines(text: &str, errors: &mut [ConfigError]) {
    for e in errors
        .iter_mut()
        .filter(|e| e.line.is_none() && !e.path.is_empty())
    {
        e.line = locate(text, &e.path);
    }
}

pub(super) fn content(l: &str) -> Option<(usize, &str)> {
    let t = l.trim_start();
    (!t.is_empty() && !t.starts_with('#')).then(|| (l.len() - t.len(), t))
}

/// Walks `a.b[2].c` down the text by indentation. A best effort: flow mappings and
/// unusual layouts stop the walk at the last line found.
pub(super) fn locate(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found: Option<usize> = None;
    let mut start = 0usize;
    let mut parent_indent: Option<usize> = None;
    for seg in path.split('.') {
        let (key, indices) = match seg.find('[') {
            Some(p) => (&seg[..p], &seg[p..]),
            None => (seg, ""),
        };
        let mut hit = None;
        for (i, l) in lines.iter().enumerate().skip(start) {
            let Some((indent, t)) = content(l) else {
                continue;
            };
            if parent_indent.is_some_and(|p| indent <= p) && !(i == start && t.starts_with("- ")) {
                break;
            }
            let t2 = t.strip_prefix("- ").unwrap_or(t);
            let k2 = t2.trim_start_matches(['"', '\'']);
            if k2.starts_with(key)
                && k2[key.len()..]
                    .trim_start_matches(['"', '\''])
                    .starts_with(':')
            {
                hit = Some((i, indent + (t.len() - t2.len())));
                break;
            }
        }
        let Some((line, indent)) = hit else {
            return found.map(|l| l + 1);
        };
        found = Some(line);
        start = line + 1;
        parent_indent = Some(indent);
        for idx in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            let Ok(n) = idx.parse::<usize>() else { break };
            let mut count = 0usize;
            let mut item_indent = None;
            let mut item = None;
            for (i, l) in lines.iter().enumerate().skip(start) {
                let Some((ind, t)) = content(l) else { continue };
                if parent_indent.is_some_and(|p| ind < p)
                    || (Some(ind) == parent_indent && !t.starts_with("- "))
                {
                    break;
                }
                if t.starts_with("- ") || t == "-" {
                    if item_indent.is_none() {
                        item_indent = Some(ind);
                    }
                    if Some(ind) == item_indent {
                        if count == n {
                            item = Some((i, ind));
                            break;
                        }
                        count += 1;
                    }
                }
            }
            let Some((line, ind)) = item else {
                return found.map(|l| l + 1);
            };
            found = Some(line);
            start = line;
            parent_indent = Some(ind);
        }
    }
    found.map(|l| l + 1)
}
