//! Syntax checks shared by every kind: object names (RFC 1123), label and annotation keys and
//! values, as Kubernetes defines them (apimachinery `util/validation`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::error::FieldError;

const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;
const LABEL_VALUE_MAX: usize = 63;
const QUALIFIED_NAME_MAX: usize = 63;
/// Kubernetes bounds the total size of an object's annotations (256 KiB).
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

/// How the names of a kind are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// RFC 1123 subdomain: pods, nodes and most kinds.
    Subdomain,
    /// RFC 1123 label: namespaces, services.
    Label,
}

fn is_alnum_lower(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Why `value` is not an RFC 1123 label, if it is not.
pub fn dns1123_label(value: &str) -> Option<String> {
    if value.len() > DNS1123_LABEL_MAX {
        return Some(format!("must be no more than {DNS1123_LABEL_MAX} characters"));
    }
    let ok = !value.is_empty()
        && value.chars().all(|c| is_alnum_lower(c) || c == '-')
        && value.starts_with(is_alnum_lower)
        && value.ends_with(is_alnum_lower);
    (!ok).then(|| {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
         and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc')"
            .to_owned()
    })
}

/// Why `value` is not an RFC 1123 subdomain, if it is not.
pub fn dns1123_subdomain(value: &str) -> Option<String> {
    if value.len() > DNS1123_SUBDOMAIN_MAX {
        return Some(format!("must be no more than {DNS1123_SUBDOMAIN_MAX} characters"));
    }
    let ok = !value.is_empty() && value.split('.').all(|part| dns1123_label(part).is_none());
    (!ok).then(|| {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' \
         or '.', and must start and end with an alphanumeric character (e.g. 'example.com')"
            .to_owned()
    })
}

/// The name part of a qualified name: alphanumerics, `-`, `_`, `.`, alphanumeric at both ends.
fn qualified_name_part(value: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !value.is_empty()
        && value.len() <= QUALIFIED_NAME_MAX
        && value.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
        && value.starts_with(alnum)
        && value.ends_with(alnum)
}

/// Why `key` is not a qualified name (`[prefix/]name`, as label and annotation keys are).
pub fn qualified_name(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && let Some(why) = dns1123_subdomain(prefix)
    {
        return Some(format!("prefix part {why}"));
    }
    (!qualified_name_part(name)).then(|| {
        format!(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start \
             and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or \
             '123-abc'), and be no more than {QUALIFIED_NAME_MAX} characters"
        )
    })
}

/// Why `value` is not a label value, if it is not (empty is allowed).
pub fn label_value(value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    if value.len() > LABEL_VALUE_MAX {
        return Some(format!("must be no more than {LABEL_VALUE_MAX} characters"));
    }
    (!qualified_name_part(value)).then(|| {
        "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' \
         or '.', and must start and end with an alphanumeric character"
            .to_owned()
    })
}

/// Checks a label map; `field` is its path (`metadata.labels`).
pub fn labels(field: &str, labels: &BTreeMap<String, String>, errors: &mut Vec<FieldError>) {
    for (key, value) in labels {
        if let Some(why) = qualified_name(key) {
            errors.push(FieldError::invalid(field, key.as_str(), why));
        }
        if let Some(why) = label_value(value) {
            errors.push(FieldError::invalid(format!("{field}[{key}]"), value.as_str(), why));
        }
    }
}

/// Checks the metadata every object has: name, labels, annotations.
pub fn object_meta(meta: &ObjectMeta, rule: NameRule, errors: &mut Vec<FieldError>) {
    match meta.name.as_deref() {
        None | Some("") => {
            errors.push(FieldError::required("metadata.name", "name or generateName is required"))
        }
        Some(name) => {
            let why = match rule {
                NameRule::Subdomain => dns1123_subdomain(name),
                NameRule::Label => dns1123_label(name),
            };
            if let Some(why) = why {
                errors.push(FieldError::invalid("metadata.name", name, why));
            }
        }
    }
    if let Some(map) = &meta.labels {
        labels("metadata.labels", map, errors);
    }
    if let Some(annotations) = &meta.annotations {
        let mut total = 0;
        for (key, value) in annotations {
            if let Some(why) = qualified_name(&key.to_lowercase()) {
                errors.push(FieldError::invalid("metadata.annotations", key.as_str(), why));
            }
            total += key.len() + value.len();
        }
        if total > ANNOTATIONS_MAX_BYTES {
            errors.push(FieldError {
                field: "metadata.annotations".to_owned(),
                kind: super::error::FieldErrorKind::Invalid(serde_json::Value::from(total)),
                detail: format!("annotations may not exceed {ANNOTATIONS_MAX_BYTES} bytes"),
            });
        }
    }
}

/// Why `name` is not an IANA service name (container port names), if it is not.
pub fn iana_service_name(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name.chars().all(|c| is_alnum_lower(c) || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    (!ok).then(|| {
        "must be no more than 15 characters, contain only lowercase alphanumerics and '-', \
         contain at least one letter, and not start or end with '-' or contain '--'"
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::{dns1123_label, dns1123_subdomain, iana_service_name, label_value, qualified_name};

    #[test]
    fn rfc1123_labels_and_subdomains() {
        assert!(dns1123_label("web-1").is_none());
        assert!(dns1123_label("Web").is_some());
        assert!(dns1123_label("-web").is_some());
        assert!(dns1123_label("web.example").is_some(), "a label has no dots");
        assert!(dns1123_label(&"a".repeat(64)).is_some());
        assert!(dns1123_subdomain("node-1.example.com").is_none());
        assert!(dns1123_subdomain("node..1").is_some());
        assert!(dns1123_subdomain("node_1").is_some());
        assert!(dns1123_subdomain("").is_some());
    }

    #[test]
    fn label_keys_and_values() {
        assert!(qualified_name("app").is_none());
        assert!(qualified_name("app.kubernetes.io/name").is_none());
        assert!(qualified_name("Bad_Prefix/name").is_some());
        assert!(qualified_name("app/").is_some());
        assert!(qualified_name("-app").is_some());
        assert!(label_value("").is_none());
        assert!(label_value("v1.2_3-x").is_none());
        assert!(label_value("has space").is_some());
        assert!(label_value(&"x".repeat(64)).is_some());
    }

    #[test]
    fn port_names() {
        assert!(iana_service_name("http").is_none());
        assert!(iana_service_name("8080").is_some(), "needs a letter");
        assert!(iana_service_name("a--b").is_some());
        assert!(iana_service_name("very-long-port-name").is_some());
    }
}
