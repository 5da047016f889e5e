//! ConfigMaps (core/v1): namespaced, no status. Keys of `data` and `binaryData` are checked as
//! Kubernetes checks them (`IsConfigMapKey`), the two maps may not share a key, their values
//! together may not exceed 1 MiB, and an `immutable` ConfigMap keeps its data (and stays
//! immutable) until it is deleted (`ValidateConfigMap`, `ValidateConfigMapUpdate`).
//!
//! Node agents receive the ConfigMaps that their pods use through NodeSync (see
//! `nodesync.rs`), for `env`, `envFrom` and `configMap` volumes.

use std::collections::BTreeSet;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use serde_json::Value;

use crate::api::{
    error::FieldError,
    kind::{KindInfo, Strategy},
    table::{self, Column},
    validation::NameRule,
};

const INFO: KindInfo = KindInfo {
    has_status: false,
    ..KindInfo::of::<ConfigMap>("configmap", true, &["cm"], NameRule::Subdomain)
};

/// The most bytes the values of one ConfigMap may hold together (Kubernetes' `MaxSecretSize`,
/// which bounds ConfigMaps too).
pub const MAX_CONFIG_MAP_BYTES: usize = 1024 * 1024;
/// A key is a file name in a `configMap` volume: at most this long.
const MAX_KEY_LENGTH: usize = 253;

/// Where ConfigMaps live in the store.
pub fn key_prefix() -> String {
    INFO.key_prefix()
}

/// The store key of one ConfigMap.
pub fn config_map_key(namespace: &str, name: &str) -> String {
    INFO.key(Some(namespace), name)
}

/// Why `key` cannot name an entry of a ConfigMap (`IsConfigMapKey`), if it cannot. The same
/// rule applies to the keys a pod refers to (`configMapKeyRef.key`, volume `items[].key`).
pub fn config_map_key_error(key: &str) -> Option<String> {
    if key.len() > MAX_KEY_LENGTH {
        return Some(format!("must be no more than {MAX_KEY_LENGTH} characters"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if key.is_empty() || !key.chars().all(allowed) {
        return Some(
            "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. \
             'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is \
             '[-._a-zA-Z0-9]+')"
                .to_owned(),
        );
    }
    // A key is a file name in a volume, beside `..data` and the timestamped directories.
    match key {
        "." => Some("must not be '.'".to_owned()),
        ".." => Some("must not be '..'".to_owned()),
        _ if key.starts_with("..") => Some("must not start with '..'".to_owned()),
        _ => None,
    }
}

/// The names of the ConfigMaps (in the pod's namespace) that a pod reads: through `env`
/// (`configMapKeyRef`), `envFrom` (`configMapRef`) and `configMap` volumes, directly or as a
/// source of a `projected` volume. Its node agent needs exactly these.
pub fn used_by(pod: &Pod) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let Some(spec) = pod.spec.as_ref() else { return names };
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    for container in containers {
        for var in container.env.iter().flatten() {
            if let Some(name) =
                var.value_from.as_ref().and_then(|f| f.config_map_key_ref.as_ref()).map(|r| &r.name)
            {
                names.insert(name.clone());
            }
        }
        for source in container.env_from.iter().flatten() {
            if let Some(reference) = &source.config_map_ref {
                names.insert(reference.name.clone());
            }
        }
    }
    for volume in spec.volumes.iter().flatten() {
        if let Some(config_map) = &volume.config_map {
            names.insert(config_map.name.clone());
        }
        let projected = volume.projected.as_ref().and_then(|p| p.sources.as_ref());
        for source in projected.into_iter().flatten() {
            if let Some(config_map) = &source.config_map {
                names.insert(config_map.name.clone());
            }
        }
    }
    names.remove("");
    names
}

/// Whether the ConfigMap says it can no longer change.
pub fn is_immutable(config_map: &ConfigMap) -> bool {
    config_map.immutable == Some(true)
}

#[derive(Debug, Default)]
pub struct ConfigMapStrategy;

const COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("Data", "Number of keys in data and binaryData").integer(),
    Column::new("Age", "Time since the ConfigMap was created"),
];

fn validate_config_map(config_map: &ConfigMap) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let data = config_map.data.as_ref();
    let binary = config_map.binary_data.as_ref();
    let mut total = 0;
    for (key, value) in data.into_iter().flatten() {
        let field = format!("data[{key}]");
        if let Some(why) = config_map_key_error(key) {
            errors.push(FieldError::invalid(field.clone(), key.as_str(), why));
        }
        if binary.is_some_and(|b| b.contains_key(key)) {
            errors.push(FieldError::invalid(
                field,
                key.as_str(),
                "duplicate of key present in binaryData",
            ));
        }
        total += value.len();
    }
    for (key, value) in binary.into_iter().flatten() {
        if let Some(why) = config_map_key_error(key) {
            errors.push(FieldError::invalid(format!("binaryData[{key}]"), key.as_str(), why));
        }
        total += value.0.len();
    }
    if total > MAX_CONFIG_MAP_BYTES {
        // Kubernetes names no field here: the limit is on the whole object.
        errors.push(FieldError::too_long(
            "",
            format!("must have at most {MAX_CONFIG_MAP_BYTES} bytes"),
        ));
    }
    errors
}

fn validate_config_map_update(new: &ConfigMap, old: &ConfigMap) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if !is_immutable(old) {
        return errors;
    }
    let immutable = "field is immutable when `immutable` is set";
    if !is_immutable(new) {
        errors.push(FieldError::forbidden("immutable", immutable));
    }
    let empty_as_none = |map: &Option<std::collections::BTreeMap<String, String>>| {
        map.clone().filter(|m| !m.is_empty())
    };
    if empty_as_none(&new.data) != empty_as_none(&old.data) {
        errors.push(FieldError::forbidden("data", immutable));
    }
    let binary = |c: &ConfigMap| c.binary_data.clone().filter(|m| !m.is_empty());
    if binary(new) != binary(old) {
        errors.push(FieldError::forbidden("binaryData", immutable));
    }
    errors
}

#[async_trait]
impl Strategy for ConfigMapStrategy {
    type Object = ConfigMap;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn prepare_for_status_update(&self, new: &mut ConfigMap, old: &ConfigMap) {
        // There is no status subresource: nothing may change through it.
        *new = old.clone();
    }

    fn validate(&self, config_map: &ConfigMap) -> Vec<FieldError> {
        validate_config_map(config_map)
    }

    fn validate_update(&self, new: &ConfigMap, old: &ConfigMap) -> Vec<FieldError> {
        validate_config_map_update(new, old)
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, config_map: &ConfigMap) -> Vec<Value> {
        let keys = config_map.data.as_ref().map_or(0, |d| d.len())
            + config_map.binary_data.as_ref().map_or(0, |d| d.len());
        vec![
            config_map.metadata.name.clone().unwrap_or_default().into(),
            keys.into(),
            table::age(config_map.metadata.creation_timestamp.as_ref()).into(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{ByteString, api::core::v1::ConfigMap};

    use super::{
        MAX_CONFIG_MAP_BYTES, config_map_key_error, validate_config_map, validate_config_map_update,
    };

    fn config_map(data: &[(&str, &str)], binary: &[(&str, &[u8])]) -> ConfigMap {
        ConfigMap {
            data: Some(data.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            binary_data: Some(
                binary.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec()))).collect(),
            ),
            ..ConfigMap::default()
        }
    }

    fn fields(errors: Vec<crate::api::error::FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_pod_uses_the_config_maps_of_its_env_env_from_and_volumes() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "spec": {
                "initContainers": [{"name": "i", "envFrom": [{"configMapRef": {"name": "init"}}]}],
                "containers": [{"name": "c", "env": [
                    {"name": "A", "value": "x"},
                    {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "env", "key": "k"}}},
                    {"name": "C", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                ]}],
                "volumes": [
                    {"name": "v", "configMap": {"name": "files"}},
                    {"name": "p", "projected": {"sources": [{"configMap": {"name": "projected"}}]}},
                    {"name": "e", "emptyDir": {}},
                ],
            }
        }))
        .unwrap();
        let used: Vec<String> = super::used_by(&pod).into_iter().collect();
        assert_eq!(used, ["env", "files", "init", "projected"]);
    }

    #[test]
    fn keys_are_file_names_of_letters_digits_dashes_underscores_and_dots() {
        for good in ["game.properties", "KEY_NAME", "key-name", ".hidden", "a..b"] {
            assert_eq!(config_map_key_error(good), None, "{good}");
        }
        for bad in ["", ".", "..", "..data", "a/b", "has space", "ü"] {
            assert!(config_map_key_error(bad).is_some(), "{bad:?} must be refused");
        }
        assert!(config_map_key_error(&"k".repeat(254)).is_some());
    }

    #[test]
    fn each_bad_key_and_each_key_in_both_maps_names_its_field() {
        let map = config_map(&[("ok", "1"), ("a/b", "2"), ("both", "3")], &[("both", b"\x00")]);
        assert_eq!(fields(validate_config_map(&map)), ["data[a/b]", "data[both]"]);
        let map = config_map(&[], &[("..x", b"1")]);
        assert_eq!(fields(validate_config_map(&map)), ["binaryData[..x]"]);
    }

    #[test]
    fn data_and_binary_data_together_may_hold_one_mebibyte() {
        let half = "x".repeat(MAX_CONFIG_MAP_BYTES / 2);
        let at_limit = config_map(&[("a", &half)], &[("b", half.as_bytes())]);
        assert!(validate_config_map(&at_limit).is_empty());
        let over = config_map(&[("a", &half), ("c", "x")], &[("b", half.as_bytes())]);
        let errors = validate_config_map(&over);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].to_string(), ": Too long: must have at most 1048576 bytes");
    }

    #[test]
    fn an_immutable_config_map_keeps_its_data_and_stays_immutable() {
        let mut old = config_map(&[("a", "1")], &[]);
        let mut new = config_map(&[("a", "2")], &[]);
        assert!(validate_config_map_update(&new, &old).is_empty(), "mutable: anything goes");
        old.immutable = Some(true);
        new.immutable = Some(true);
        assert_eq!(fields(validate_config_map_update(&new, &old)), ["data"]);
        let mut unlocked = old.clone();
        unlocked.immutable = Some(false);
        assert_eq!(fields(validate_config_map_update(&unlocked, &old)), ["immutable"]);
        let mut relabelled = old.clone();
        relabelled.metadata.labels = Some(BTreeMap::from([("k".to_owned(), "v".to_owned())]));
        relabelled.binary_data = Some(BTreeMap::new());
        assert!(
            validate_config_map_update(&relabelled, &old).is_empty(),
            "metadata may still change"
        );
    }
}
