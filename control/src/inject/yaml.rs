//! A small block-style YAML emitter for JSON values, in the layout `kubectl` prints.
//!
//! Why not a serde YAML serializer: those quote by YAML 1.2 rules, so they print `yes`,
//! `on` or `1:20` bare, and kubectl (YAML 1.1) reads those back as a bool or an int,
//! turning a ConfigMap value into an invalid object. This emitter quotes every string that
//! is not plainly a string under both YAML 1.1 and 1.2. It must never print YAML that
//! parses to a different value.

use serde_json::{Map, Value};

/// Renders one document (no `---` marker).
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => map(&mut out, m, 0, false),
        Value::Array(a) if !a.is_empty() => seq(&mut out, a, 0, false),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

fn pad(out: &mut String, indent: usize) {
    for _ in 0..indent {
        out.push(' ');
    }
}

fn map(out: &mut String, m: &Map<String, Value>, indent: usize, first_inline: bool) {
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 || !first_inline {
            pad(out, indent);
        }
        out.push_str(&string(k));
        out.push(':');
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                map(out, inner, indent + 2, false);
            }
            // Sequences under a key sit at the key's indentation, as kubectl prints them.
            Value::Array(items) if !items.is_empty() => {
                out.push('\n');
                seq(out, items, indent, false);
            }
            _ => {
                out.push(' ');
                value_inline(out, v, indent + 2);
            }
        }
    }
}

fn seq(out: &mut String, items: &[Value], indent: usize, first_inline: bool) {
    for (i, v) in items.iter().enumerate() {
        if i > 0 || !first_inline {
            pad(out, indent);
        }
        out.push_str("- ");
        match v {
            Value::Object(inner) if !inner.is_empty() => map(out, inner, indent + 2, true),
            Value::Array(inner) if !inner.is_empty() => seq(out, inner, indent + 2, true),
            _ => value_inline(out, v, indent + 2),
        }
    }
}

/// A scalar (or empty collection) after `key: ` or `- `, ending the line; multi-line
/// strings become literal blocks indented by `indent`.
fn value_inline(out: &mut String, v: &Value, indent: usize) {
    if let Value::String(s) = v {
        if let Some(chomp) = literal_chomping(s) {
            out.push('|');
            out.push_str(chomp);
            out.push('\n');
            let body = match chomp {
                "-" => s.as_str(),
                _ => &s[..s.len() - 1],
            };
            for line in body.split('\n') {
                if !line.is_empty() {
                    pad(out, indent);
                    out.push_str(line);
                }
                out.push('\n');
            }
            return;
        }
    }
    out.push_str(&scalar(v));
    out.push('\n');
}

/// The chomping indicator if `s` can be a literal block scalar, else `None`.
fn literal_chomping(s: &str) -> Option<&'static str> {
    let printable = s
        .chars()
        .all(|c| c == '\n' || (!c.is_control() && c != '\u{feff}'));
    let starts_ok = !s.starts_with([' ', '\n']);
    if !s.contains('\n') || !printable || !starts_ok || s.trim().is_empty() {
        return None;
    }
    let trailing = s.len() - s.trim_end_matches('\n').len();
    // Lines of only spaces would change the detected indentation or be folded away.
    if s.split('\n')
        .any(|l| !l.is_empty() && l.trim_matches(' ').is_empty())
    {
        return None;
    }
    Some(match trailing {
        0 => "-",
        1 => "",
        _ => "+",
    })
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string(s),
        Value::Array(_) => "[]".to_owned(),
        Value::Object(_) => "{}".to_owned(),
    }
}

/// A string, plain when that is unambiguous, else double-quoted (JSON escapes are valid
/// YAML double-quoted escapes).
fn string(s: &str) -> String {
    if plain_is_safe(s) {
        s.to_owned()
    } else {
        serde_json::to_string(s).unwrap_or_default()
    }
}

fn plain_is_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let second = s.chars().nth(1);
    let first_ok = first.is_ascii_alphanumeric()
        || matches!(first, '/' | '_' | '.')
        || (first == '-' && second.is_some_and(|c| c == '-' || c.is_ascii_alphabetic()));
    let chars_ok = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=+@,%()~^$ ".contains(c));
    if !first_ok || !chars_ok || s.ends_with([' ', ':']) || s.contains(": ") || s.contains(" #") {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    let keyword = [
        "true", "false", "yes", "no", "on", "off", "y", "n", "null", "~", ".inf", ".nan", "-.inf",
    ]
    .contains(&lower.as_str());
    // Anything that could read as a number, a date or a base-60 int in YAML 1.1 or 1.2.
    let numeric_start = first.is_ascii_digit()
        || (matches!(first, '.' | '+' | '-')
            && second.is_some_and(|c| c.is_ascii_digit() || c == '.'));
    let numeric_chars = s
        .chars()
        .all(|c| c.is_ascii_hexdigit() || "._:+-xXoO ".contains(c));
    let looks_numeric = numeric_start && numeric_chars;
    !(keyword || looks_numeric)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    const TRICKY: &[&str] = &[
        "yes",
        "No",
        "on",
        "OFF",
        "y",
        "n",
        "null",
        "~",
        "true",
        "1:20",
        "0123",
        "0x1F",
        "0o17",
        "12.5",
        ".5",
        "+1",
        "-1",
        "1e3",
        "2001-12-14",
        ".inf",
        "-.inf",
        ".NaN",
        "",
        " lead",
        "trail ",
        "a: b",
        "a:b",
        "x:",
        "#x",
        "x #y",
        "- x",
        "-",
        "--listen",
        "-x",
        "*star",
        "&amp",
        "!tag",
        "%pct",
        "@at",
        "`tick",
        "{x}",
        "[x]",
        ",x",
        "?x",
        "|x",
        ">x",
        "'q'",
        "\"q\"",
        "back\\slash",
        "tab\tin",
        "unicode é",
        "multi\nline\n",
        "strip\nend",
        "keep\n\n",
        " lead\nline",
        "a\n \nb",
        "\n",
        "cr\r\nlf",
        "800ms",
        "50m",
        "64Mi",
        "25%",
        "app.kubernetes.io/name",
        "0.0.0.0:15080",
        "http://a.b.svc:80",
        "checkout-v2,  search",
        "1.4.2",
        "=",
        "a=b",
        "0 3 * * *",
    ];

    fn reparse(text: &str) -> Value {
        Value::deserialize(serde_norway::Deserializer::from_str(text)).unwrap()
    }

    #[test]
    fn every_string_reads_back_as_the_same_string() {
        let doc = json!({
            "map": TRICKY.iter().map(|s| (s.to_string(), json!(s))).collect::<Map<_, _>>(),
            "list": TRICKY,
            "nested": [[1, "a"], [], {}, [{"k": [true, null, 1.5, -3]}]],
            "empty": {}, "none": [], "n": null,
        });
        let text = to_yaml(&doc);
        assert_eq!(reparse(&text), doc, "{text}");
        assert_eq!(to_yaml(&reparse(&text)), text, "stable under a round trip");
    }

    #[test]
    fn yaml_1_1_booleans_and_numbers_are_quoted() {
        let text = to_yaml(&json!({"a": "yes", "b": "on", "c": "1:20", "d": "0123", "e": "800ms"}));
        assert_eq!(
            text,
            "a: \"yes\"\nb: \"on\"\nc: \"1:20\"\nd: \"0123\"\ne: 800ms\n"
        );
    }

    #[test]
    fn layout_matches_kubectl() {
        let doc = json!({"spec": {"containers": [{"name": "a", "args": ["--x=1"]}], "script": "echo a\necho b\n"}});
        assert_eq!(
            to_yaml(&doc),
            "spec:\n  containers:\n  - name: a\n    args:\n    - --x=1\n  script: |\n    echo a\n    echo b\n"
        );
    }
}
