//! Server-side printing: `meta.k8s.io` `Table` responses, which kubectl asks for with
//! `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` and prints column by column. The
//! type is not in k8s-openapi, so it is built here.

use serde_json::{Value, json};

use super::error::ApiError;

/// One column of a kind's table. `priority > 0` columns are shown only with `-o wide`.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    pub name: &'static str,
    /// `string` or `integer` (OpenAPI type names).
    pub kind: &'static str,
    /// `name` marks the column holding the object's name.
    pub format: &'static str,
    pub description: &'static str,
    pub priority: i32,
}

impl Column {
    pub const fn new(name: &'static str, description: &'static str) -> Self {
        Self { name, kind: "string", format: "", description, priority: 0 }
    }

    pub const fn name_column() -> Self {
        Self {
            name: "Name",
            kind: "string",
            format: "name",
            description: "Name must be unique within a namespace.",
            priority: 0,
        }
    }

    pub const fn integer(self) -> Self {
        Self { kind: "integer", ..self }
    }

    pub const fn wide(self) -> Self {
        Self { priority: 1, ..self }
    }

    fn to_json(self) -> Value {
        json!({
            "name": self.name,
            "type": self.kind,
            "format": self.format,
            "description": self.description,
            "priority": self.priority,
        })
    }
}

/// What each table row carries besides its cells (`?includeObject=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    /// A `PartialObjectMetadata` (the default).
    Metadata,
    Object,
}

/// The representation a client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFormat {
    Json,
    Table {
        /// `meta.k8s.io/v1` or `meta.k8s.io/v1beta1`, as requested.
        api_version: &'static str,
        include_object: IncludeObject,
    },
}

const ACCEPTED: &str = "application/json, application/json;as=Table;v=v1;g=meta.k8s.io";

/// Picks the first media range of `accept` that the server can produce. JSON is the fallback
/// for every client that also takes it (kubectl 1.32+ offers protobuf first, then JSON).
pub fn negotiate(
    accept: Option<&str>,
    include_object: Option<&str>,
) -> Result<ResponseFormat, ApiError> {
    let include_object = match include_object {
        None | Some("") | Some("Metadata") => IncludeObject::Metadata,
        Some("None") => IncludeObject::None,
        Some("Object") => IncludeObject::Object,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "includeObject: unsupported value {other:?}; supported values: \"None\", \"Metadata\", \"Object\""
            )));
        }
    };
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(ResponseFormat::Json);
    };
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let mut params = std::collections::HashMap::new();
        for param in parts {
            if let Some((key, value)) = param.split_once('=') {
                params.insert(key.trim().to_ascii_lowercase(), value.trim().trim_matches('"'));
            }
        }
        if !matches!(media.as_str(), "application/json" | "application/*" | "*/*") {
            continue;
        }
        match params.get("as").copied() {
            None => return Ok(ResponseFormat::Json),
            Some("Table") if params.get("g").copied() == Some("meta.k8s.io") => {
                let api_version = match params.get("v").copied() {
                    Some("v1") => "meta.k8s.io/v1",
                    Some("v1beta1") => "meta.k8s.io/v1beta1",
                    _ => continue,
                };
                return Ok(ResponseFormat::Table { api_version, include_object });
            }
            // Other conversions (PartialObjectMetadata, aggregated discovery) are not served.
            Some(_) => continue,
        }
    }
    Err(ApiError::NotAcceptable { accepted: ACCEPTED.to_owned() })
}

/// One row: its cells and the object it describes (serialized, with metadata).
pub struct Row {
    pub cells: Vec<Value>,
    pub object: Value,
}

/// Builds a `Table` object.
pub fn build(
    api_version: &str,
    columns: &[Column],
    rows: Vec<Row>,
    resource_version: Option<&str>,
    include_object: IncludeObject,
) -> Value {
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            let mut out = json!({"cells": row.cells});
            match include_object {
                IncludeObject::None => {}
                IncludeObject::Object => out["object"] = row.object,
                IncludeObject::Metadata => {
                    out["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": api_version,
                        "metadata": row.object.get("metadata").cloned().unwrap_or(json!({})),
                    })
                }
            }
            out
        })
        .collect();
    let mut metadata = json!({});
    if let Some(resource_version) = resource_version {
        metadata["resourceVersion"] = resource_version.into();
    }
    json!({
        "kind": "Table",
        "apiVersion": api_version,
        "metadata": metadata,
        "columnDefinitions": columns.iter().map(|c| c.to_json()).collect::<Vec<_>>(),
        "rows": rows,
    })
}

/// An age as `kubectl get` prints it: `45s`, `3m20s`, `5h`, `2d4h`, `3y`. Precision falls as
/// the age grows (apimachinery `util/duration.HumanDuration` rules).
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".to_owned();
    }
    if seconds < 0 {
        return "0s".to_owned();
    }
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let rest = seconds % 60;
        return if rest == 0 { format!("{minutes}m") } else { format!("{minutes}m{rest}s") };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let rest = minutes % 60;
        return if rest == 0 { format!("{hours}h") } else { format!("{hours}h{rest}m") };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        let rest = hours % 24;
        return if rest == 0 { format!("{days}d") } else { format!("{days}d{rest}h") };
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        let rest = days % 365;
        return if rest == 0 { format!("{years}y") } else { format!("{years}y{rest}d") };
    }
    format!("{years}y")
}

/// The AGE cell of an object created at `created`.
pub fn age(created: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    match created {
        Some(time) => {
            let now = super::typed::now_timestamp();
            human_duration(now.as_second() - time.0.as_second())
        }
        None => "<unknown>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::{IncludeObject, ResponseFormat, human_duration, negotiate};

    const KUBECTL_GET: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

    #[test]
    fn kubectl_get_is_answered_with_a_v1_table() {
        assert_eq!(
            negotiate(Some(KUBECTL_GET), None).unwrap(),
            ResponseFormat::Table {
                api_version: "meta.k8s.io/v1",
                include_object: IncludeObject::Metadata
            }
        );
    }

    #[test]
    fn protobuf_first_falls_back_to_json() {
        let accept = "application/vnd.kubernetes.protobuf,application/json";
        assert_eq!(negotiate(Some(accept), None).unwrap(), ResponseFormat::Json);
        assert_eq!(negotiate(None, None).unwrap(), ResponseFormat::Json);
        assert!(negotiate(Some("application/vnd.kubernetes.protobuf"), None).is_err());
        assert!(negotiate(Some(KUBECTL_GET), Some("Everything")).is_err());
    }

    #[test]
    fn ages_lose_precision_as_they_grow() {
        assert_eq!(human_duration(-5), "<invalid>");
        assert_eq!(human_duration(-1), "0s");
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 120), "3h2m");
        assert_eq!(human_duration(20 * 3600), "20h");
        assert_eq!(human_duration(3 * 86400 + 4 * 3600), "3d4h");
        assert_eq!(human_duration(100 * 86400), "100d");
        assert_eq!(human_duration(3 * 365 * 86400 + 10 * 86400), "3y10d");
        assert_eq!(human_duration(10 * 365 * 86400), "10y");
    }
}
