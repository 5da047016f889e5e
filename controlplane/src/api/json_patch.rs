//! JSON patch (RFC 6902), the `application/json-patch+json` PATCH body of `kubectl patch
//! --type json` and `kubectl rollout undo`: a list of operations, applied in order, all or
//! nothing. Locations are JSON pointers (RFC 6901).

use serde_json::Value;

/// Why a JSON patch was refused. `Malformed` is a patch that is not a valid RFC 6902
/// document (400 in Kubernetes); `NotApplicable` a valid one that does not apply to this
/// object, a failed `test` included (422).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JsonPatchError {
    #[error("the JSON patch is malformed: {0}")]
    Malformed(String),
    #[error("operation {index} ({op} {path}): {reason}")]
    NotApplicable { index: usize, op: String, path: String, reason: String },
}

/// Applies every operation of `patch` to `document`, or none: on error `document` is as it
/// was.
pub fn apply(document: &mut Value, patch: &Value) -> Result<(), JsonPatchError> {
    let operations = parse(patch)?;
    let mut working = document.clone();
    for (index, operation) in operations.iter().enumerate() {
        operation.apply(&mut working).map_err(|reason| JsonPatchError::NotApplicable {
            index,
            op: operation.name().to_owned(),
            path: operation.path_text().to_owned(),
            reason,
        })?;
    }
    *document = working;
    Ok(())
}

/// A parsed JSON pointer: its text (for messages) and its reference tokens.
#[derive(Debug, Clone)]
struct Pointer {
    text: String,
    tokens: Vec<String>,
}

impl Pointer {
    /// RFC 6901 section 3 and 4: `""` is the whole document, otherwise `/`-separated tokens
    /// in which `~1` stands for `/` and `~0` for `~`.
    fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(Self { text: String::new(), tokens: Vec::new() });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("the pointer {text:?} does not start with '/'"));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c != '~' {
                    token.push(c);
                    continue;
                }
                match chars.next() {
                    Some('0') => token.push('~'),
                    Some('1') => token.push('/'),
                    _ => {
                        return Err(format!(
                            "the pointer {text:?} has a '~' not followed by 0 or 1"
                        ));
                    }
                }
            }
            tokens.push(token);
        }
        Ok(Self { text: text.to_owned(), tokens })
    }

    /// Whether `self` is `other` or lies inside it.
    fn starts_with(&self, other: &Self) -> bool {
        self.tokens.len() >= other.tokens.len() && self.tokens[..other.tokens.len()] == other.tokens
    }
}

#[derive(Debug)]
enum Operation {
    Add { path: Pointer, value: Value },
    Remove { path: Pointer },
    Replace { path: Pointer, value: Value },
    Move { from: Pointer, path: Pointer },
    Copy { from: Pointer, path: Pointer },
    Test { path: Pointer, value: Value },
}

fn parse(patch: &Value) -> Result<Vec<Operation>, JsonPatchError> {
    let malformed =
        |index: usize, why: String| JsonPatchError::Malformed(format!("operation {index}: {why}"));
    let Value::Array(list) = patch else {
        return Err(JsonPatchError::Malformed("a JSON patch must be a list of operations".into()));
    };
    let mut operations = Vec::with_capacity(list.len());
    for (index, entry) in list.iter().enumerate() {
        let Value::Object(entry) = entry else {
            return Err(malformed(index, "an operation must be an object".to_owned()));
        };
        let text = |member: &str| match entry.get(member) {
            Some(Value::String(text)) => Ok(text.as_str()),
            Some(_) => Err(malformed(index, format!("\"{member}\" must be a string"))),
            None => Err(malformed(index, format!("\"{member}\" is missing"))),
        };
        let pointer =
            |member: &str| Pointer::parse(text(member)?).map_err(|why| malformed(index, why));
        // A present `null` is a value (RFC 6902 section 4.1: the member must be present).
        let value = || {
            entry
                .get("value")
                .cloned()
                .ok_or_else(|| malformed(index, "\"value\" is missing".to_owned()))
        };
        let operation = match text("op")? {
            "add" => Operation::Add { path: pointer("path")?, value: value()? },
            "remove" => Operation::Remove { path: pointer("path")? },
            "replace" => Operation::Replace { path: pointer("path")?, value: value()? },
            "move" => Operation::Move { from: pointer("from")?, path: pointer("path")? },
            "copy" => Operation::Copy { from: pointer("from")?, path: pointer("path")? },
            "test" => Operation::Test { path: pointer("path")?, value: value()? },
            other => return Err(malformed(index, format!("unknown op {other:?}"))),
        };
        operations.push(operation);
    }
    Ok(operations)
}

/// An array index token: digits without a leading zero (RFC 6901 section 4).
fn array_index(token: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let valid = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    let index: usize = if valid {
        token.parse().map_err(|_| format!("index {token:?} is too large"))?
    } else {
        return Err(format!("{token:?} is not an array index"));
    };
    let limit = if allow_end { len } else { len.saturating_sub(1) };
    if index > limit || (!allow_end && len == 0) {
        return Err(format!("index {index} is out of bounds (the array has {len} elements)"));
    }
    Ok(index)
}

fn get<'a>(document: &'a Value, pointer: &Pointer) -> Result<&'a Value, String> {
    let mut current = document;
    for token in &pointer.tokens {
        current = match current {
            Value::Object(map) => map
                .get(token)
                .ok_or_else(|| format!("no member {token:?} at {:?}", pointer.text))?,
            Value::Array(list) => &list[array_index(token, list.len(), false)?],
            _ => return Err(format!("{:?} goes through a scalar", pointer.text)),
        };
    }
    Ok(current)
}

/// The container of the last token, and the last token. Fails for the root pointer.
fn parent_mut<'a>(
    document: &'a mut Value,
    pointer: &'a Pointer,
) -> Result<(&'a mut Value, &'a str), String> {
    let Some((last, parents)) = pointer.tokens.split_last() else {
        return Err("the whole document has no parent".to_owned());
    };
    let mut current = document;
    for token in parents {
        current = match current {
            Value::Object(map) => map
                .get_mut(token)
                .ok_or_else(|| format!("no member {token:?} on the way to {:?}", pointer.text))?,
            Value::Array(list) => {
                let index = array_index(token, list.len(), false)?;
                &mut list[index]
            }
            _ => return Err(format!("{:?} goes through a scalar", pointer.text)),
        };
    }
    Ok((current, last))
}

fn add(document: &mut Value, path: &Pointer, value: Value) -> Result<(), String> {
    if path.tokens.is_empty() {
        *document = value;
        return Ok(());
    }
    let (parent, last) = parent_mut(document, path)?;
    match parent {
        Value::Object(map) => {
            map.insert(last.to_owned(), value);
        }
        Value::Array(list) => {
            let index = array_index(last, list.len(), true)?;
            list.insert(index, value);
        }
        _ => return Err(format!("the parent of {:?} is not an object or array", path.text)),
    }
    Ok(())
}

fn remove(document: &mut Value, path: &Pointer) -> Result<Value, String> {
    if path.tokens.is_empty() {
        return Ok(std::mem::take(document));
    }
    let (parent, last) = parent_mut(document, path)?;
    match parent {
        Value::Object(map) => map
            .remove(last)
            .ok_or_else(|| format!("no member {last:?} to remove at {:?}", path.text)),
        Value::Array(list) => {
            let index = array_index(last, list.len(), false)?;
            Ok(list.remove(index))
        }
        _ => Err(format!("the parent of {:?} is not an object or array", path.text)),
    }
}

/// JSON equality with numbers compared by value (RFC 6902 section 4.6).
fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => a == b || a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| equal(a, b))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| equal(v, w)))
        }
        _ => a == b,
    }
}

impl Operation {
    fn name(&self) -> &'static str {
        match self {
            Self::Add { .. } => "add",
            Self::Remove { .. } => "remove",
            Self::Replace { .. } => "replace",
            Self::Move { .. } => "move",
            Self::Copy { .. } => "copy",
            Self::Test { .. } => "test",
        }
    }

    fn path_text(&self) -> &str {
        match self {
            Self::Add { path, .. }
            | Self::Remove { path }
            | Self::Replace { path, .. }
            | Self::Move { path, .. }
            | Self::Copy { path, .. }
            | Self::Test { path, .. } => &path.text,
        }
    }

    fn apply(&self, document: &mut Value) -> Result<(), String> {
        match self {
            Self::Add { path, value } => add(document, path, value.clone()),
            Self::Remove { path } => remove(document, path).map(drop),
            Self::Replace { path, value } => {
                // RFC 6902 section 4.3 wants the target to exist. Kubernetes' JSON patch
                // library lets a replace of a missing object member add it, and kubectl relies
                // on that (`rollout undo` replaces `/metadata/annotations` whether or not the
                // deployment has any), so a missing member is added; a missing array element
                // or parent is still an error.
                if get(document, path).is_ok() {
                    remove(document, path)?;
                } else if !matches!(parent_mut(document, path), Ok((Value::Object(_), _))) {
                    get(document, path)?;
                }
                add(document, path, value.clone())
            }
            Self::Move { from, path } => {
                if path.starts_with(from) && path.tokens.len() > from.tokens.len() {
                    return Err(format!("{:?} cannot move into its own child", from.text));
                }
                let value = remove(document, from)?;
                add(document, path, value)
            }
            Self::Copy { from, path } => {
                let value = get(document, from)?.clone();
                add(document, path, value)
            }
            Self::Test { path, value } => {
                let found = get(document, path)?;
                if equal(found, value) {
                    Ok(())
                } else {
                    Err(format!("test failed: the value is {found}, not {value}"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{JsonPatchError, apply};

    /// (what the case shows, document, patch, expected document)
    #[test]
    fn operations_apply_as_rfc6902_specifies() {
        let cases = [
            (
                "add a member (A.1)",
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/baz", "value": "qux"}]),
                json!({"foo": "bar", "baz": "qux"}),
            ),
            (
                "add into an array (A.2)",
                json!({"foo": ["bar", "baz"]}),
                json!([{"op": "add", "path": "/foo/1", "value": "qux"}]),
                json!({"foo": ["bar", "qux", "baz"]}),
            ),
            (
                "remove a member (A.3)",
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "remove", "path": "/baz"}]),
                json!({"foo": "bar"}),
            ),
            (
                "remove an element (A.4)",
                json!({"foo": ["bar", "qux", "baz"]}),
                json!([{"op": "remove", "path": "/foo/1"}]),
                json!({"foo": ["bar", "baz"]}),
            ),
            (
                "replace a value (A.5)",
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "replace", "path": "/baz", "value": "boo"}]),
                json!({"baz": "boo", "foo": "bar"}),
            ),
            (
                "move a value (A.6)",
                json!({"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}}),
                json!([{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}]),
                json!({"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}),
            ),
            (
                "move an element (A.7)",
                json!({"foo": ["all", "grass", "cows", "eat"]}),
                json!([{"op": "move", "from": "/foo/1", "path": "/foo/3"}]),
                json!({"foo": ["all", "cows", "eat", "grass"]}),
            ),
            (
                "test passes (A.8)",
                json!({"baz": "qux", "foo": ["a", 2, "c"]}),
                json!([{"op": "test", "path": "/baz", "value": "qux"}, {"op": "test", "path": "/foo/1", "value": 2}]),
                json!({"baz": "qux", "foo": ["a", 2, "c"]}),
            ),
            (
                "add a nested object (A.10)",
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/child", "value": {"grandchild": {}}}]),
                json!({"foo": "bar", "child": {"grandchild": {}}}),
            ),
            (
                "add an array value (A.16)",
                json!({"foo": ["bar"]}),
                json!([{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}]),
                json!({"foo": ["bar", ["abc", "def"]]}),
            ),
            (
                "escaped tokens (A.14)",
                json!({"/": 9, "~1": 10}),
                json!([{"op": "test", "path": "/~01", "value": 10}, {"op": "copy", "from": "/~1", "path": "/slash"}]),
                json!({"/": 9, "~1": 10, "slash": 9}),
            ),
            (
                "test compares numbers by value",
                json!({"n": 1}),
                json!([{"op": "test", "path": "/n", "value": 1.0}]),
                json!({"n": 1}),
            ),
            (
                "copy then replace the whole document",
                json!({"a": 1}),
                json!([{"op": "copy", "from": "/a", "path": "/b"}, {"op": "replace", "path": "", "value": {"c": 3}}]),
                json!({"c": 3}),
            ),
            (
                "rollout undo's two replaces",
                json!({"metadata": {"annotations": {"a": "1"}}, "spec": {"template": {"x": 1}}}),
                json!([{"op": "replace", "path": "/spec/template", "value": {"x": 2}}, {"op": "replace", "path": "/metadata/annotations", "value": {"b": "2"}}]),
                json!({"metadata": {"annotations": {"b": "2"}}, "spec": {"template": {"x": 2}}}),
            ),
            (
                "a null value is a value",
                json!({"a": 1}),
                json!([{"op": "add", "path": "/b", "value": null}]),
                json!({"a": 1, "b": null}),
            ),
            (
                "replace adds a missing member, as Kubernetes' JSON patch does",
                json!({"metadata": {}}),
                json!([{"op": "replace", "path": "/metadata/annotations", "value": {"a": "1"}}]),
                json!({"metadata": {"annotations": {"a": "1"}}}),
            ),
        ];
        for (what, mut document, patch, expected) in cases {
            apply(&mut document, &patch).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(document, expected, "{what}");
        }
    }

    #[test]
    fn failing_operations_leave_the_document_unchanged() {
        let original = json!({"foo": ["bar"], "baz": "qux"});
        let cases = [
            ("test fails (A.9)", json!([{"op": "test", "path": "/baz", "value": "bar"}])),
            ("a missing target (A.12)", json!([{"op": "add", "path": "/baz/bat", "value": "qux"}])),
            ("remove of a missing member", json!([{"op": "remove", "path": "/nothing"}])),
            (
                "replace of a missing element",
                json!([{"op": "replace", "path": "/foo/3", "value": 1}]),
            ),
            (
                "replace under a missing parent",
                json!([{"op": "replace", "path": "/a/b", "value": 1}]),
            ),
            ("an index out of bounds", json!([{"op": "add", "path": "/foo/5", "value": 1}])),
            ("a leading-zero index", json!([{"op": "remove", "path": "/foo/01"}])),
            (
                "a move into its own child",
                json!([{"op": "move", "from": "/foo", "path": "/foo/0"}]),
            ),
            (
                "the last op fails after others applied",
                json!([{"op": "add", "path": "/new", "value": 1}, {"op": "remove", "path": "/foo/-"}]),
            ),
        ];
        for (what, patch) in cases {
            let mut document = original.clone();
            let error = apply(&mut document, &patch).expect_err(what);
            assert!(matches!(error, JsonPatchError::NotApplicable { .. }), "{what}: {error:?}");
            assert_eq!(document, original, "{what}: the document changed");
        }
    }

    #[test]
    fn malformed_patches_are_told_apart() {
        let cases: [(&str, Value); 6] = [
            ("not a list", json!({"op": "add"})),
            ("an unknown op (A.11 aside)", json!([{"op": "frob", "path": "/a"}])),
            ("a missing value (A.15)", json!([{"op": "add", "path": "/a"}])),
            ("a missing from", json!([{"op": "copy", "path": "/a"}])),
            ("a pointer without a leading slash", json!([{"op": "remove", "path": "a"}])),
            ("a bad escape", json!([{"op": "remove", "path": "/a~2"}])),
        ];
        for (what, patch) in cases {
            let mut document = json!({"a": 1});
            let error = apply(&mut document, &patch).expect_err(what);
            assert!(matches!(error, JsonPatchError::Malformed(_)), "{what}: {error:?}");
        }
    }
}
