//! Every error the API server reports, and the one place where an error becomes a Kubernetes
//! `Status` object with its HTTP code and reason (apimachinery `metav1.StatusReason`).

use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use serde_json::{Value, json};

use crate::{error_chain, store::StoreError};

/// Why a field is invalid, in the vocabulary of Kubernetes validation
/// (apimachinery `field.ErrorType`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldErrorKind {
    Required,
    /// The value is wrong; the offending value is shown in the message (as JSON, so strings
    /// are quoted and numbers are not, as Kubernetes prints them).
    Invalid(Value),
    Duplicate(Value),
    Forbidden,
    NotSupported(Value),
    /// Longer than a limit; the detail says which (`must have at most 1048576 bytes`).
    TooLong,
    /// It refers to something that does not exist (a volume a mount names).
    NotFound(Value),
}

/// One invalid field: its JSON path (`spec.containers[0].image`) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub kind: FieldErrorKind,
    pub detail: String,
}

impl FieldError {
    pub fn required(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { field: field.into(), kind: FieldErrorKind::Required, detail: detail.into() }
    }

    pub fn invalid(
        field: impl Into<String>,
        value: impl Into<Value>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Invalid(value.into()),
            detail: detail.into(),
        }
    }

    pub fn duplicate(field: impl Into<String>, value: impl Into<Value>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Duplicate(value.into()),
            detail: String::new(),
        }
    }

    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { field: field.into(), kind: FieldErrorKind::Forbidden, detail: detail.into() }
    }

    pub fn not_found(field: impl Into<String>, value: impl Into<Value>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::NotFound(value.into()),
            detail: String::new(),
        }
    }

    pub fn too_long(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { field: field.into(), kind: FieldErrorKind::TooLong, detail: detail.into() }
    }

    pub fn not_supported(
        field: impl Into<String>,
        value: impl Into<Value>,
        supported: &[&str],
    ) -> Self {
        let supported: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        Self {
            field: field.into(),
            kind: FieldErrorKind::NotSupported(value.into()),
            detail: format!("supported values: {}", supported.join(", ")),
        }
    }

    fn reason(&self) -> &'static str {
        match self.kind {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Invalid(_) => "FieldValueInvalid",
            FieldErrorKind::Duplicate(_) => "FieldValueDuplicate",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
            FieldErrorKind::NotSupported(_) => "FieldValueNotSupported",
            FieldErrorKind::TooLong => "FieldValueTooLong",
            FieldErrorKind::NotFound(_) => "FieldValueNotFound",
        }
    }

    /// The message without the field path, as Kubernetes words it.
    fn message(&self) -> String {
        let (what, value) = match &self.kind {
            FieldErrorKind::Required => ("Required value", None),
            FieldErrorKind::Invalid(value) => ("Invalid value", Some(value)),
            FieldErrorKind::Duplicate(value) => ("Duplicate value", Some(value)),
            FieldErrorKind::Forbidden => ("Forbidden", None),
            FieldErrorKind::NotSupported(value) => ("Unsupported value", Some(value)),
            FieldErrorKind::TooLong => ("Too long", None),
            FieldErrorKind::NotFound(value) => ("Not found", Some(value)),
        };
        let mut message = what.to_owned();
        if let Some(value) = value {
            message.push_str(&format!(": {value}"));
        }
        if !self.detail.is_empty() {
            message.push_str(&format!(": {}", self.detail));
        }
        message
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message())
    }
}

/// An API request that failed. `resource` is the plural resource name (`pods`), as in
/// Kubernetes' `details.kind` of NotFound and AlreadyExists.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{resource} {name:?} not found")]
    NotFound { resource: String, name: String },
    #[error("{resource} {name:?} already exists")]
    AlreadyExists { resource: String, name: String },
    #[error("Operation cannot be fulfilled on {resource} {name:?}: {message}")]
    Conflict { resource: String, name: String, message: String },
    /// Server-side apply would change fields other managers own: each conflict is the
    /// owner (`conflict with "kubectl" using apps/v1`) and the field (`.spec.replicas`).
    #[error("{}", apply_conflict_message(.conflicts))]
    ApplyConflict { resource: String, name: String, conflicts: Vec<(String, String)> },
    #[error("{kind} {name:?} is invalid: {}", join_field_errors(.causes))]
    Invalid { kind: String, name: String, causes: Vec<FieldError> },
    #[error("{0}")]
    BadRequest(String),
    /// A well-formed patch that does not apply to the object (a JSON patch's failed `test`,
    /// a missing path): 422 as Kubernetes answers it.
    #[error("the patch does not apply: {0}")]
    PatchNotApplicable(String),
    /// The request carried no credential (or one the server does not accept).
    #[error("Unauthorized")]
    Unauthorized,
    #[error("{}", forbidden_message(.resource, .name, .message))]
    Forbidden { resource: String, name: String, message: String, cause: Option<(String, String)> },
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error(
        "the body of the request was in an unknown format - accepted media types include: {accepted}"
    )]
    UnsupportedMediaType { accepted: String },
    #[error("only the following media types are accepted: {accepted}")]
    NotAcceptable { accepted: String },
    #[error("the request is larger than the {limit} bytes allowed")]
    RequestEntityTooLarge { limit: usize },
    #[error("too old resource version: {requested} ({compacted})")]
    Expired { requested: u64, compacted: u64 },
    #[error("the server could not find the requested resource")]
    UnknownPath,
    #[error("{action}")]
    Internal {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// As Kubernetes words it: `Apply failed with 1 conflict: conflict with "a" using v1: .spec.x`.
fn apply_conflict_message(conflicts: &[(String, String)]) -> String {
    let noun = if conflicts.len() == 1 { "conflict" } else { "conflicts" };
    let listed: Vec<String> =
        conflicts.iter().map(|(owner, field)| format!("{owner}: {field}")).collect();
    format!("Apply failed with {} {noun}: {}", conflicts.len(), listed.join("\n"))
}

/// As apimachinery's `NewForbidden` words it: `pods "web" is forbidden: …`, without the name
/// for a collection, without the resource for a non-resource path.
fn forbidden_message(resource: &str, name: &str, message: &str) -> String {
    match (resource.is_empty(), name.is_empty()) {
        (true, _) => format!("forbidden: {message}"),
        (false, true) => format!("{resource} is forbidden: {message}"),
        (false, false) => format!("{resource} {name:?} is forbidden: {message}"),
    }
}

fn join_field_errors(causes: &[FieldError]) -> String {
    let parts: Vec<String> = causes.iter().map(ToString::to_string).collect();
    if parts.len() == 1 { parts.join("") } else { format!("[{}]", parts.join(", ")) }
}

impl ApiError {
    /// A store failure while doing `action` (answered as 500 InternalError).
    pub fn store(action: impl Into<String>) -> impl FnOnce(StoreError) -> Self {
        let action = action.into();
        move |source| Self::Internal { action, source: Box::new(source) }
    }

    pub fn internal(
        action: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Internal { action: action.into(), source: Box::new(source) }
    }

    pub fn code(&self) -> StatusCode {
        match self {
            Self::NotFound { .. } | Self::UnknownPath => StatusCode::NOT_FOUND,
            Self::AlreadyExists { .. } | Self::Conflict { .. } | Self::ApplyConflict { .. } => {
                StatusCode::CONFLICT
            }
            Self::Invalid { .. } | Self::PatchNotApplicable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotAcceptable { .. } => StatusCode::NOT_ACCEPTABLE,
            Self::RequestEntityTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Expired { .. } => StatusCode::GONE,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } | Self::UnknownPath => "NotFound",
            Self::AlreadyExists { .. } => "AlreadyExists",
            Self::Conflict { .. } | Self::ApplyConflict { .. } => "Conflict",
            Self::Invalid { .. } | Self::PatchNotApplicable(_) => "Invalid",
            Self::BadRequest(_) => "BadRequest",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden { .. } => "Forbidden",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            Self::NotAcceptable { .. } => "NotAcceptable",
            Self::RequestEntityTooLarge { .. } => "RequestEntityTooLarge",
            Self::Expired { .. } => "Expired",
            Self::Internal { .. } => "InternalError",
        }
    }

    /// The `metav1.Status` object for this error.
    pub fn to_status(&self) -> Value {
        let message = match self {
            // The cause chain is the useful part of an internal error.
            Self::Internal { action, source } => format!("{action}: {}", error_chain(&**source)),
            other => other.to_string(),
        };
        let details = match self {
            Self::NotFound { resource, name }
            | Self::AlreadyExists { resource, name }
            | Self::Conflict { resource, name, .. } => {
                Some(json!({"name": name, "kind": resource}))
            }
            Self::ApplyConflict { resource, name, conflicts } => {
                let causes: Vec<Value> = conflicts
                    .iter()
                    .map(|(owner, field)| {
                        json!({"type": "FieldManagerConflict", "message": owner, "field": field})
                    })
                    .collect();
                Some(json!({"name": name, "kind": resource, "causes": causes}))
            }
            Self::Forbidden { resource, name, cause, .. } => {
                let mut details = json!({"name": name, "kind": resource});
                if let Some((kind, message)) = cause {
                    details["causes"] = json!([{"reason": kind, "message": message}]);
                }
                Some(details)
            }
            Self::Invalid { kind, name, causes } => {
                let causes: Vec<Value> = causes
                    .iter()
                    .map(|cause| {
                        json!({
                            "reason": cause.reason(),
                            "message": cause.message(),
                            "field": cause.field,
                        })
                    })
                    .collect();
                Some(json!({"name": name, "kind": kind, "causes": causes}))
            }
            _ => None,
        };
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": self.reason(),
            "code": self.code().as_u16(),
        });
        if let Some(details) = details {
            status["details"] = details;
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal { .. } = &self {
            tracing::error!(error = %error_chain(&self), "API request failed");
        }
        let body = self.to_status().to_string();
        (self.code(), [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::{ApiError, FieldError};

    #[test]
    fn invalid_lists_every_field_with_its_path() {
        let error = ApiError::Invalid {
            kind: "Pod".to_owned(),
            name: "web".to_owned(),
            causes: vec![
                FieldError::required("spec.containers", ""),
                FieldError::invalid(
                    "spec.containers[0].ports[0].containerPort",
                    0,
                    "must be between 1 and 65535, inclusive",
                ),
            ],
        };
        let status = error.to_status();
        assert_eq!(status["code"], 422);
        assert_eq!(status["reason"], "Invalid");
        assert_eq!(
            status["details"]["causes"][1]["field"],
            "spec.containers[0].ports[0].containerPort"
        );
        assert_eq!(status["details"]["causes"][0]["reason"], "FieldValueRequired");
        assert_eq!(
            status["message"],
            "Pod \"web\" is invalid: [spec.containers: Required value, spec.containers[0].ports[0].containerPort: Invalid value: 0: must be between 1 and 65535, inclusive]"
        );
    }

    #[test]
    fn not_found_names_the_resource_like_kubernetes() {
        let error = ApiError::NotFound { resource: "pods".to_owned(), name: "x".to_owned() };
        let status = error.to_status();
        assert_eq!(status["message"], "pods \"x\" not found");
        assert_eq!(status["details"], serde_json::json!({"name": "x", "kind": "pods"}));
        assert_eq!(status["code"], 404);
    }
}
