//! Label and field selectors, as `labelSelector=` and `fieldSelector=` query parameters carry
//! them (apimachinery `pkg/labels` and `pkg/fields` syntax).

use std::collections::BTreeMap;

use super::validation;

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelRequirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector: every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// Splits on commas that are not inside parentheses (`a in (x,y),b` is two requirements).
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth.checked_sub(1).ok_or_else(|| format!("unbalanced ')' in {text:?}"))?
            }
            ',' if depth == 0 => {
                parts.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in {text:?}"));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn checked_key(key: &str) -> Result<String, String> {
    let key = key.trim();
    match validation::qualified_name(key) {
        None => Ok(key.to_owned()),
        Some(why) => Err(format!("invalid label key {key:?}: {why}")),
    }
}

fn checked_value(value: &str) -> Result<String, String> {
    let value = value.trim();
    match validation::label_value(value) {
        None => Ok(value.to_owned()),
        Some(why) => Err(format!("invalid label value {value:?}: {why}")),
    }
}

fn value_set(key: &str, rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesized set of values after {key:?}"))?;
    inner.split(',').map(checked_value).collect()
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self { requirements });
        }
        for part in split_top_level(text)? {
            let part = part.trim();
            let requirement = if let Some((key, value)) = part.split_once("!=") {
                LabelRequirement::NotEquals(checked_key(key)?, checked_value(value)?)
            } else if let Some((key, value)) = part.split_once("==") {
                LabelRequirement::Equals(checked_key(key)?, checked_value(value)?)
            } else if let Some((key, value)) = part.split_once('=') {
                LabelRequirement::Equals(checked_key(key)?, checked_value(value)?)
            } else if let Some((key, rest)) = part.split_once(" notin ") {
                let key = checked_key(key)?;
                let values = value_set(&key, rest)?;
                LabelRequirement::NotIn(key, values)
            } else if let Some((key, rest)) = part.split_once(" in ") {
                let key = checked_key(key)?;
                let values = value_set(&key, rest)?;
                LabelRequirement::In(key, values)
            } else if let Some(key) = part.strip_prefix('!') {
                LabelRequirement::NotExists(checked_key(key)?)
            } else if part.contains(['<', '>', '(', ')', ' ']) {
                return Err(format!("unsupported label requirement {part:?}"));
            } else {
                LabelRequirement::Exists(checked_key(part)?)
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |key: &str| labels.and_then(|labels| labels.get(key));
        self.requirements.iter().all(|requirement| match requirement {
            LabelRequirement::Exists(key) => get(key).is_some(),
            LabelRequirement::NotExists(key) => get(key).is_none(),
            LabelRequirement::Equals(key, value) => get(key) == Some(value),
            LabelRequirement::NotEquals(key, value) => get(key) != Some(value),
            LabelRequirement::In(key, values) => get(key).is_some_and(|v| values.contains(v)),
            LabelRequirement::NotIn(key, values) => !get(key).is_some_and(|v| values.contains(v)),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldRequirement {
    field: String,
    equals: bool,
    value: String,
}

/// A parsed field selector: `field=value` and `field!=value` terms, all of which must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

/// Splits a field selector into terms on unescaped commas, keeping escapes for
/// [`split_term`] (apimachinery `fields.EscapeValue` escapes `\\`, `,` and `=`).
fn split_terms(text: &str) -> Vec<String> {
    let mut terms = vec![String::new()];
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            ',' => terms.push(String::new()),
            c => {
                if let Some(term) = terms.last_mut() {
                    term.push(c);
                    if c == '\\'
                        && let Some(escaped) = chars.next()
                    {
                        term.push(escaped);
                    }
                }
            }
        }
    }
    terms
}

/// Finds the operator of one term, skipping escaped characters.
fn split_term(term: &str) -> Option<(String, bool, String)> {
    let bytes: Vec<char> = term.chars().collect();
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            '\\' => index += 2,
            '!' if bytes.get(index + 1) == Some(&'=') => {
                return Some((collect(&bytes[..index]), false, unescape(&bytes[index + 2..])));
            }
            '=' => {
                let skip = if bytes.get(index + 1) == Some(&'=') { 2 } else { 1 };
                return Some((collect(&bytes[..index]), true, unescape(&bytes[index + skip..])));
            }
            _ => index += 1,
        }
    }
    None
}

fn collect(chars: &[char]) -> String {
    chars.iter().collect::<String>().trim().to_owned()
}

fn unescape(chars: &[char]) -> String {
    let mut out = String::new();
    let mut iter = chars.iter();
    while let Some(c) = iter.next() {
        if *c == '\\' {
            if let Some(next) = iter.next() {
                out.push(*next);
            }
        } else {
            out.push(*c);
        }
    }
    out
}

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            if term.trim().is_empty() {
                continue;
            }
            let (field, equals, value) = split_term(&term)
                .ok_or_else(|| format!("invalid selector: {text:?}; can't understand {term:?}"))?;
            requirements.push(FieldRequirement { field, equals, value });
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The field paths the selector uses, to check them against what a kind supports.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.requirements.iter().map(|r| r.field.as_str())
    }

    /// `value_of` gives the value of a supported field (empty when unset).
    pub fn matches(&self, value_of: impl Fn(&str) -> String) -> bool {
        self.requirements.iter().all(|r| (value_of(&r.field) == r.value) == r.equals)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{FieldSelector, LabelSelector};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn label_selector_equality_and_set_forms() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let check = |text: &str, set: &BTreeMap<String, String>| {
            LabelSelector::parse(text).expect("parses").matches(Some(set))
        };
        assert!(check("app=web", &web));
        assert!(check("app==web,tier", &web));
        assert!(!check("app=web", &db));
        assert!(check("app!=web", &db));
        assert!(check("app in (web, db)", &db));
        assert!(!check("app notin (web,db)", &db));
        assert!(check("!tier", &db));
        assert!(!check("!tier", &web));
        assert!(check("app in (web,db),tier=front", &web));
        assert!(LabelSelector::parse("app=web").unwrap().matches(Some(&web)));
        assert!(!LabelSelector::parse("app").unwrap().matches(None));
        assert!(LabelSelector::parse("app notin (x)").unwrap().matches(None));
    }

    #[test]
    fn malformed_label_selectors_are_rejected() {
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("app in (web").is_err());
        assert!(LabelSelector::parse("a b").is_err());
        assert!(LabelSelector::parse("app=has space").is_err());
    }

    #[test]
    fn field_selector_terms() {
        let selector =
            FieldSelector::parse("spec.nodeName=n1,status.phase!=Succeeded,status.phase!=Failed")
                .unwrap();
        assert_eq!(
            selector.fields().collect::<Vec<_>>(),
            ["spec.nodeName", "status.phase", "status.phase"]
        );
        let pod = |node: &'static str, phase: &'static str| {
            move |field: &str| match field {
                "spec.nodeName" => node.to_owned(),
                "status.phase" => phase.to_owned(),
                _ => String::new(),
            }
        };
        assert!(selector.matches(pod("n1", "Running")));
        assert!(!selector.matches(pod("n1", "Failed")));
        assert!(!selector.matches(pod("n2", "Running")));
        let escaped = FieldSelector::parse(r"metadata.name==a\,b").unwrap();
        assert!(escaped.matches(|_| "a,b".to_owned()));
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
