//! Where a key is written: the 1-based line of a key path (`tproxy-firewall.fwmark`,
//! `proxies[2].port`, `rules[7]`) in the YAML text, for errors serde cannot place.

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

fn blank(l: &str) -> bool {
    let t = l.trim();
    t.is_empty() || t.starts_with('#')
}

/// `name[1][2]` → (`name`, [1, 2]).
fn split_segment(segment: &str) -> (&str, Vec<usize>) {
    let mut parts = segment.split('[');
    let name = parts.next().unwrap_or(segment);
    let indexes = parts
        .filter_map(|p| p.trim_end_matches(']').parse().ok())
        .collect();
    (name, indexes)
}

/// The line of `key:` at or after `from`, inside the block whose parent sits at `parent`
/// indentation (None: the top level).
fn find_key(lines: &[&str], from: usize, parent: Option<usize>, key: &str) -> Option<usize> {
    let wanted = format!("{key}:");
    for (i, l) in lines.iter().enumerate().skip(from) {
        if blank(l) {
            continue;
        }
        let t = l.trim_start().trim_start_matches("- ");
        match parent {
            None if indent(l) == 0 && t.starts_with(&wanted) => return Some(i),
            None => {}
            // The first line of a list item holds its first key after the dash.
            Some(p) if i > from && indent(l) <= p => return None,
            Some(_) if t.starts_with(&wanted) => return Some(i),
            Some(_) => {}
        }
    }
    None
}

/// The line of item `n` of the block list under the key on line `key_line`.
fn find_item(lines: &[&str], key_line: usize, n: usize) -> Option<usize> {
    let key_indent = indent(lines[key_line]);
    let mut item_indent = None;
    let mut count = 0;
    for (i, l) in lines.iter().enumerate().skip(key_line + 1) {
        if blank(l) {
            continue;
        }
        let is_item = l.trim_start().starts_with('-');
        if indent(l) < key_indent || (indent(l) == key_indent && !is_item) {
            return None;
        }
        if is_item && *item_indent.get_or_insert(indent(l)) == indent(l) {
            if count == n {
                return Some(i);
            }
            count += 1;
        }
    }
    None
}

/// The 1-based line where `key` is written; for a key that is not found, the line of the
/// deepest part of its path that is.
pub(super) fn line_of(text: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let (mut from, mut parent, mut found) = (0, None::<usize>, None);
    for segment in key.split('.') {
        let (name, indexes) = split_segment(segment);
        let Some(mut at) = find_key(&lines, from, parent, name) else {
            break;
        };
        found = Some(at + 1);
        parent = Some(indent(lines[at]));
        from = at + 1;
        for n in indexes {
            let Some(item) = find_item(&lines, at, n) else {
                return found;
            };
            at = item;
            found = Some(at + 1);
            parent = Some(indent(lines[at]));
            from = at;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::line_of;

    const TEXT: &str = "\
mode: rule
tproxy-firewall:
  interfaces: [lan0]
  # a comment
  fwmark: 0
proxies:
  - name: a
    type: socks5
    port: 1
  - {name: b, type: http}
  - name: c
    port: 3
rules:
- DOMAIN,a,DIRECT

- MATCH,DIRECT
";

    #[test]
    fn finds_nested_keys_list_items_and_their_keys() {
        assert_eq!(line_of(TEXT, "mode"), Some(1));
        assert_eq!(line_of(TEXT, "tproxy-firewall.fwmark"), Some(5));
        assert_eq!(line_of(TEXT, "proxies[0]"), Some(7));
        assert_eq!(line_of(TEXT, "proxies[0].name"), Some(7));
        assert_eq!(line_of(TEXT, "proxies[0].port"), Some(9));
        assert_eq!(line_of(TEXT, "proxies[1]"), Some(10));
        assert_eq!(line_of(TEXT, "proxies[2].port"), Some(12));
        assert_eq!(line_of(TEXT, "rules[1]"), Some(16));
        assert_eq!(
            line_of(TEXT, "rules[9]"),
            Some(13),
            "falls back to the list"
        );
        assert_eq!(line_of(TEXT, "nothing"), None);
    }
}
