//! Where a key is written: the 1-based line of a dotted key path in the YAML text, for errors
//! that serde cannot place (cross-key rules, values it reports at their mapping).

/// The 1-based line where dotted `key` (`tproxy-firewall.fwmark`) is written: each segment is
/// looked for among the lines indented deeper than its parent's.
pub(super) fn line_of(text: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let (mut from, mut parent, mut found) = (0, None::<usize>, None);
    for segment in key.split('.') {
        let segment = segment.split('[').next().unwrap_or(segment);
        let wanted = format!("{segment}:");
        let mut hit = None;
        for (i, l) in lines.iter().enumerate().skip(from) {
            let t = l.trim_start().trim_start_matches("- ");
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            match parent {
                None if indent(l) == 0 && t.starts_with(&wanted) => hit = Some(i),
                None => {}
                Some(p) if indent(l) <= p => break,
                Some(_) if t.starts_with(&wanted) => hit = Some(i),
                Some(_) => {}
            }
            if hit.is_some() {
                break;
            }
        }
        let i = hit?;
        found = Some(i + 1);
        parent = Some(indent(lines[i]));
        from = i + 1;
    }
    found
}
