//! Field selectors (`metadata.name`, `metadata.namespace`, with `=`, `==`,
//! `!=`) and label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`,
//! `k in (a,b)`, `k notin (a,b)`) for list and watch.

use serde_json::Value;

use super::store::StatusError;

#[derive(Debug)]
enum Label {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// The selectors of one list or watch request.
#[derive(Debug, Default)]
pub(crate) struct Selector {
    /// (metadata field, equal?, value)
    fields: Vec<(&'static str, bool, String)>,
    labels: Vec<Label>,
}

/// Splits on commas outside parentheses.
fn terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.retain(|t| !t.is_empty());
    out
}

impl Selector {
    pub(crate) fn parse(fields: Option<&str>, labels: Option<&str>) -> Result<Self, StatusError> {
        let mut sel = Selector::default();
        for term in terms(fields.unwrap_or_default()) {
            let (key, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(StatusError::bad_request(format!(
                    "invalid field selector: {term:?}: expected an operator"
                )));
            };
            let field = match key.trim() {
                "metadata.name" => "name",
                "metadata.namespace" => "namespace",
                other => {
                    return Err(StatusError::bad_request(format!(
                        "field label not supported: {other}"
                    )))
                }
            };
            sel.fields.push((field, eq, value.trim().to_owned()));
        }
        for term in terms(labels.unwrap_or_default()) {
            sel.labels.push(parse_label(term)?);
        }
        Ok(sel)
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        let fields_ok = self.fields.iter().all(|(field, eq, value)| {
            let have = meta[*field].as_str().unwrap_or_default();
            (have == value) == *eq
        });
        fields_ok
            && self.labels.iter().all(|req| {
                let get = |k: &str| meta["labels"][k].as_str();
                match req {
                    Label::Eq(k, v) => get(k) == Some(v.as_str()),
                    Label::Ne(k, v) => get(k) != Some(v.as_str()),
                    Label::Exists(k) => get(k).is_some(),
                    Label::Absent(k) => get(k).is_none(),
                    Label::In(k, vs) => get(k).is_some_and(|h| vs.iter().any(|v| v == h)),
                    Label::NotIn(k, vs) => get(k).is_none_or(|h| vs.iter().all(|v| v != h)),
                }
            })
    }
}

fn parse_label(term: &str) -> Result<Label, StatusError> {
    let bad = || StatusError::bad_request(format!("unable to parse requirement: {term:?}"));
    let set = |rest: &str| -> Result<Vec<String>, StatusError> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(bad)?;
        Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    if let Some(k) = term.strip_prefix('!') {
        return Ok(Label::Absent(k.trim().to_owned()));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Label::Ne(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Label::Eq(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, rest)) = term.split_once(" notin ") {
        return Ok(Label::NotIn(k.trim().to_owned(), set(rest)?));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return Ok(Label::In(k.trim().to_owned(), set(rest)?));
    }
    if term.contains(char::is_whitespace) || term.contains('(') {
        return Err(bad());
    }
    Ok(Label::Exists(term.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::Selector;
    use serde_json::json;

    #[test]
    fn selectors_match() {
        let obj = json!({"metadata": {"name": "a", "namespace": "ns", "labels": {"app": "web", "tier": "x"}}});
        let yes = |f: Option<&str>, l: Option<&str>| Selector::parse(f, l).unwrap().matches(&obj);
        assert!(yes(Some("metadata.name=a"), None));
        assert!(yes(Some("metadata.name==a,metadata.namespace=ns"), None));
        assert!(!yes(Some("metadata.name!=a"), None));
        assert!(yes(None, Some("app=web,tier in (x,y),!gone,app")));
        assert!(!yes(None, Some("app notin (web)")));
        assert!(Selector::parse(Some("spec.x=1"), None).is_err());
    }
}
