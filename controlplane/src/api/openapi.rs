//! Minimal OpenAPI documents: no schemas yet, only what kubectl looks for before it leaves
//! validation to the server. For every kind, the PATCH operation of its object path carries
//! the `x-kubernetes-group-version-kind` extension and a `fieldValidation` query parameter;
//! finding them, kubectl sends `?fieldValidation=Strict` instead of refusing to create an
//! object it cannot validate itself (kubectl 1.29+ read OpenAPI v3 as JSON, 1.27 and 1.28 read
//! v2 as protobuf).

use prost::Message;
use serde_json::{Value, json};

use super::Registry;

/// The v2 protobuf media type, in the form Go's MIME parser accepts (kubectl rejects the
/// `…spec.v2@v1.0+protobuf` spelling it sends in `Accept`).
pub const OPENAPI_V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// One kind's object path and group-version-kind.
struct KindPath {
    path: String,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
}

fn kind_paths(registry: &Registry, only: Option<(&str, &str)>) -> Vec<KindPath> {
    registry
        .handlers()
        .iter()
        .map(|handler| handler.info())
        .filter(|info| {
            only.is_none_or(|(group, version)| info.group == group && info.version == version)
        })
        .map(|info| {
            let prefix = if info.group.is_empty() {
                format!("/api/{}", info.version)
            } else {
                format!("/apis/{}/{}", info.group, info.version)
            };
            let path = if info.namespaced {
                format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", info.plural)
            } else {
                format!("{prefix}/{}/{{name}}", info.plural)
            };
            KindPath { path, group: info.group, version: info.version, kind: info.kind }
        })
        .collect()
}

/// The OpenAPI v3 document of one group version, `None` when nothing is served there.
pub fn v3_document(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let kinds = kind_paths(registry, Some((group, version)));
    if kinds.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    for kind in kinds {
        paths.insert(
            kind.path,
            json!({"patch": {
                "x-kubernetes-group-version-kind": {"group": kind.group, "version": kind.version, "kind": kind.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }}),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "strait", "version": version},
        "components": {"schemas": {}},
        "paths": paths,
    }))
}

/// The OpenAPI v3 index: one entry per group version, with a content hash in its URL
/// (clients cache documents by it).
pub fn v3_index(registry: &Registry) -> Value {
    let mut versions: Vec<(&str, &str)> =
        registry.handlers().iter().map(|h| (h.info().group, h.info().version)).collect();
    versions.sort();
    versions.dedup();
    let mut paths = serde_json::Map::new();
    for (group, version) in versions {
        let Some(document) = v3_document(registry, group, version) else {
            continue;
        };
        let name = if group.is_empty() {
            format!("api/{version}")
        } else {
            format!("apis/{group}/{version}")
        };
        let url =
            format!("/openapi/v3/{name}?hash={}", document_hash(document.to_string().as_bytes()));
        paths.insert(name, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

/// A short, stable digest (FNV-1a): it only has to change when the document does.
fn document_hash(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016X}")
}

/// The subset of gnostic's `openapi.v2` messages (`openapiv2/OpenAPIv2.proto`) that the
/// document uses, with the same field numbers. `oneof` members are plain optional fields,
/// which encode identically.
mod gnostic {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Document {
        #[prost(string, tag = "1")]
        pub swagger: String,
        #[prost(message, optional, tag = "2")]
        pub info: Option<Info>,
        #[prost(message, optional, tag = "8")]
        pub paths: Option<Paths>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Info {
        #[prost(string, tag = "1")]
        pub title: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Paths {
        #[prost(message, repeated, tag = "2")]
        pub path: Vec<NamedPathItem>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamedPathItem {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<PathItem>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PathItem {
        #[prost(message, optional, tag = "8")]
        pub patch: Option<Operation>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Operation {
        #[prost(message, repeated, tag = "8")]
        pub parameters: Vec<ParametersItem>,
        #[prost(message, repeated, tag = "13")]
        pub vendor_extension: Vec<NamedAny>,
    }

    /// `oneof { Parameter parameter = 1; JsonReference json_reference = 2; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ParametersItem {
        #[prost(message, optional, tag = "1")]
        pub parameter: Option<Parameter>,
    }

    /// `oneof { BodyParameter body_parameter = 1; NonBodyParameter non_body_parameter = 2; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Parameter {
        #[prost(message, optional, tag = "2")]
        pub non_body_parameter: Option<NonBodyParameter>,
    }

    /// `oneof { …; QueryParameterSubSchema query_parameter_sub_schema = 3; … }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NonBodyParameter {
        #[prost(message, optional, tag = "3")]
        pub query_parameter_sub_schema: Option<QueryParameterSubSchema>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueryParameterSubSchema {
        #[prost(string, tag = "2")]
        pub r#in: String,
        #[prost(string, tag = "4")]
        pub name: String,
        #[prost(string, tag = "6")]
        pub r#type: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamedAny {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<Any>,
    }

    /// `Any { google.protobuf.Any value = 1; string yaml = 2; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "2")]
        pub yaml: String,
    }
}

/// The OpenAPI v2 document of every served kind, as gnostic protobuf.
pub fn v2_protobuf(registry: &Registry) -> Vec<u8> {
    let path = kind_paths(registry, None)
        .into_iter()
        .map(|kind| gnostic::NamedPathItem {
            name: kind.path,
            value: Some(gnostic::PathItem {
                patch: Some(gnostic::Operation {
                    parameters: vec![gnostic::ParametersItem {
                        parameter: Some(gnostic::Parameter {
                            non_body_parameter: Some(gnostic::NonBodyParameter {
                                query_parameter_sub_schema: Some(
                                    gnostic::QueryParameterSubSchema {
                                        r#in: "query".to_owned(),
                                        name: "fieldValidation".to_owned(),
                                        r#type: "string".to_owned(),
                                    },
                                ),
                            }),
                        }),
                    }],
                    vendor_extension: vec![gnostic::NamedAny {
                        name: "x-kubernetes-group-version-kind".to_owned(),
                        value: Some(gnostic::Any {
                            yaml: format!(
                                "group: {:?}\nkind: {}\nversion: {}\n",
                                kind.group, kind.kind, kind.version
                            ),
                        }),
                    }],
                }),
            }),
        })
        .collect();
    gnostic::Document {
        swagger: "2.0".to_owned(),
        info: Some(gnostic::Info { title: "strait".to_owned(), version: "v1".to_owned() }),
        paths: Some(gnostic::Paths { path }),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prost::Message;

    use super::{gnostic, v2_protobuf, v3_document, v3_index};
    use crate::{
        api::Registry,
        ipam::PodCidrAllocator,
        store::{RedbStore, RedbStoreOptions},
        testing::TempDataDir,
    };

    fn registry(dir: &TempDataDir) -> Registry {
        let store =
            RedbStore::open(&dir.path().join("store.redb"), RedbStoreOptions::default()).unwrap();
        let allocator = PodCidrAllocator::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        Registry::new(Arc::new(store), Arc::new(allocator))
    }

    #[test]
    fn v3_patch_operations_name_their_kind_and_take_field_validation() {
        let dir = TempDataDir::new("openapi-v3");
        let registry = registry(&dir);
        let index = v3_index(&registry);
        let url = index["paths"]["api/v1"]["serverRelativeURL"].as_str().unwrap();
        assert!(url.starts_with("/openapi/v3/api/v1?hash="), "{url}");
        let document = v3_document(&registry, "", "v1").unwrap();
        let pods = &document["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"];
        assert_eq!(pods["x-kubernetes-group-version-kind"]["kind"], "Pod");
        assert_eq!(pods["parameters"][0]["name"], "fieldValidation");
        assert!(document["paths"]["/api/v1/nodes/{name}"].is_object(), "cluster-scoped path");
        assert!(v3_document(&registry, "batch", "v1").is_none(), "a group not served");
        let apps = v3_document(&registry, "apps", "v1").expect("apps/v1 is served");
        assert!(
            apps["paths"]["/apis/apps/v1/namespaces/{namespace}/replicasets/{name}"].is_object()
        );
    }

    #[test]
    fn v2_protobuf_decodes_with_the_gnostic_field_numbers() {
        let dir = TempDataDir::new("openapi-v2");
        let document = gnostic::Document::decode(v2_protobuf(&registry(&dir)).as_slice()).unwrap();
        let paths = document.paths.unwrap().path;
        let nodes = paths.iter().find(|p| p.name == "/api/v1/nodes/{name}").unwrap();
        let patch = nodes.value.as_ref().unwrap().patch.as_ref().unwrap();
        assert_eq!(
            patch.vendor_extension[0].value.as_ref().unwrap().yaml,
            "group: \"\"\nkind: Node\nversion: v1\n"
        );
        let query =
            patch.parameters[0].parameter.as_ref().unwrap().non_body_parameter.as_ref().unwrap();
        assert_eq!(query.query_parameter_sub_schema.as_ref().unwrap().name, "fieldValidation");
    }
}
