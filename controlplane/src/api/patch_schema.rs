//! The list semantics of the served kinds, in one table: how a strategic merge patch merges a
//! list (Kubernetes' `patchStrategy` / `patchMergeKey` struct tags, published as
//! `x-kubernetes-patch-strategy` / `x-kubernetes-patch-merge-key`) and how server-side apply
//! tracks it (`+listType` / `+listMapKey`, published as `x-kubernetes-list-type` /
//! `x-kubernetes-list-map-keys`).
//!
//! Only fields that differ from the defaults, and the struct fields on the way to them, are
//! listed. The defaults are those of Kubernetes: objects merge key by key; a list with no
//! entry is replaced whole by a strategic merge patch and is atomic to server-side apply.
//! The two vocabularies differ in places, as they do upstream: container ports merge by
//! `containerPort` but are keyed by `containerPort` and `protocol` for apply, Service ports
//! by `port` against `port` and `protocol`, and tolerations, taints and EndpointSlice
//! endpoints are replaced whole by both.
//!
//! A kind added to the server without an entry in [`kind_schema`] gets `metadata` only; its
//! own lists are then replaced whole, which is always safe but may surprise a client that
//! expects merging. Add the kind here when it has merged lists.

/// How a strategic merge patch treats a list field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchStrategy {
    /// The patch's list replaces the stored one (no `patchStrategy` tag).
    Replace,
    /// Lists of scalars merge as sets: the patch's values are added (`patchStrategy:"merge"`
    /// without a merge key, e.g. `metadata.finalizers`).
    MergeScalars,
    /// Lists of objects merge element by element, matched on this key.
    MergeByKey(&'static str),
}

/// How server-side apply identifies the elements of a list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListType {
    /// The list is one value, owned whole.
    Atomic,
    /// Scalars, each owned on its own (`v:` in managed fields).
    Set,
    /// Objects identified by these fields (`k:` in managed fields).
    Map(&'static [&'static str]),
}

/// One field with non-default semantics, or on the way to one.
#[derive(Debug)]
pub struct FieldSchema {
    pub name: &'static str,
    /// For lists; `Replace` otherwise.
    pub strategy: PatchStrategy,
    /// For lists; `Atomic` otherwise (unused for objects).
    pub list_type: ListType,
    /// `patchStrategy:"retainKeys"`: clients (`kubectl apply`) send `$retainKeys` for this
    /// field's objects (or, on a list, for each element), so that switching between the
    /// members of a union (a volume's source, a deployment's strategy type) clears the old
    /// one. The server honours `$retainKeys` wherever it appears; this records where
    /// Kubernetes declares it.
    pub retain_keys: bool,
    /// The schema of the field's value (for lists: of each element).
    pub schema: Option<&'static TypeSchema>,
}

/// The fields of one object type that need an entry.
#[derive(Debug)]
pub struct TypeSchema {
    pub fields: &'static [FieldSchema],
}

impl TypeSchema {
    pub fn field(&self, name: &str) -> Option<&'static FieldSchema> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The schema of the value of field `name` (of its elements, for lists).
    pub fn child(&self, name: &str) -> Option<&'static TypeSchema> {
        self.field(name).and_then(|f| f.schema)
    }
}

/// An object-valued field leading to more entries.
const fn object(name: &'static str, schema: &'static TypeSchema) -> FieldSchema {
    FieldSchema {
        name,
        strategy: PatchStrategy::Replace,
        list_type: ListType::Atomic,
        retain_keys: false,
        schema: Some(schema),
    }
}

/// A list of objects merged on `key` (strategic merge) and keyed on `keys` (apply).
const fn keyed(
    name: &'static str,
    key: &'static str,
    keys: &'static [&'static str],
    schema: Option<&'static TypeSchema>,
) -> FieldSchema {
    FieldSchema {
        name,
        strategy: PatchStrategy::MergeByKey(key),
        list_type: ListType::Map(keys),
        retain_keys: false,
        schema,
    }
}

/// A list of objects with the same key for both (the common case).
const fn by(name: &'static str, key: &'static [&'static str]) -> FieldSchema {
    keyed(name, key[0], key, None)
}

/// A list of scalars that merges as a set.
const fn scalar_set(name: &'static str) -> FieldSchema {
    FieldSchema {
        name,
        strategy: PatchStrategy::MergeScalars,
        list_type: ListType::Set,
        retain_keys: false,
        schema: None,
    }
}

/// A list that strategic merge replaces but apply keys (SSA-only `listType=map`).
const fn apply_keyed(name: &'static str, keys: &'static [&'static str]) -> FieldSchema {
    FieldSchema {
        name,
        strategy: PatchStrategy::Replace,
        list_type: ListType::Map(keys),
        retain_keys: false,
        schema: None,
    }
}

const fn retain_keys(field: FieldSchema) -> FieldSchema {
    FieldSchema { retain_keys: true, ..field }
}

/// Status conditions: merged and keyed by `type` wherever they appear.
const CONDITIONS: FieldSchema = by("conditions", &["type"]);

pub static OBJECT_META: TypeSchema = TypeSchema {
    fields: &[
        scalar_set("finalizers"),
        by("ownerReferences", &["uid"]),
        // Managed fields are rewritten whole by the server; clients replace them whole.
    ],
};

static CONTAINER: TypeSchema = TypeSchema {
    fields: &[
        keyed("ports", "containerPort", &["containerPort", "protocol"], None),
        by("env", &["name"]),
        by("volumeMounts", &["mountPath"]),
        by("volumeDevices", &["devicePath"]),
    ],
};

static POD_SPEC: TypeSchema = TypeSchema {
    fields: &[
        keyed("containers", "name", &["name"], Some(&CONTAINER)),
        keyed("initContainers", "name", &["name"], Some(&CONTAINER)),
        keyed("ephemeralContainers", "name", &["name"], Some(&CONTAINER)),
        retain_keys(by("volumes", &["name"])),
        by("imagePullSecrets", &["name"]),
        by("hostAliases", &["ip"]),
        keyed(
            "topologySpreadConstraints",
            "topologyKey",
            &["topologyKey", "whenUnsatisfiable"],
            None,
        ),
        by("schedulingGates", &["name"]),
        retain_keys(by("resourceClaims", &["name"])),
    ],
};

static POD_STATUS: TypeSchema =
    TypeSchema { fields: &[CONDITIONS, by("podIPs", &["ip"]), by("hostIPs", &["ip"])] };

static POD: TypeSchema = TypeSchema {
    fields: &[
        object("metadata", &OBJECT_META),
        object("spec", &POD_SPEC),
        object("status", &POD_STATUS),
    ],
};

static POD_TEMPLATE_SPEC: TypeSchema =
    TypeSchema { fields: &[object("metadata", &OBJECT_META), object("spec", &POD_SPEC)] };

static WORKLOAD_STATUS: TypeSchema = TypeSchema { fields: &[CONDITIONS] };

static DEPLOYMENT_SPEC: TypeSchema = TypeSchema {
    fields: &[
        object("template", &POD_TEMPLATE_SPEC),
        // `strategy` switches between `Recreate` and `RollingUpdate` (with its parameters).
        retain_keys(object("strategy", &NO_FIELDS)),
    ],
};

static DEPLOYMENT: TypeSchema = TypeSchema {
    fields: &[
        object("metadata", &OBJECT_META),
        object("spec", &DEPLOYMENT_SPEC),
        object("status", &WORKLOAD_STATUS),
    ],
};

static REPLICA_SET_SPEC: TypeSchema =
    TypeSchema { fields: &[object("template", &POD_TEMPLATE_SPEC)] };

static REPLICA_SET: TypeSchema = TypeSchema {
    fields: &[
        object("metadata", &OBJECT_META),
        object("spec", &REPLICA_SET_SPEC),
        object("status", &WORKLOAD_STATUS),
    ],
};

static SERVICE_SPEC: TypeSchema =
    TypeSchema { fields: &[keyed("ports", "port", &["port", "protocol"], None)] };

static SERVICE: TypeSchema = TypeSchema {
    fields: &[
        object("metadata", &OBJECT_META),
        object("spec", &SERVICE_SPEC),
        object("status", &WORKLOAD_STATUS),
    ],
};

static NODE_SPEC: TypeSchema = TypeSchema { fields: &[scalar_set("podCIDRs")] };

static NODE_STATUS: TypeSchema = TypeSchema {
    fields: &[CONDITIONS, by("addresses", &["type"]), apply_keyed("images", &["names"])],
};

static NODE: TypeSchema = TypeSchema {
    fields: &[
        object("metadata", &OBJECT_META),
        object("spec", &NODE_SPEC),
        object("status", &NODE_STATUS),
    ],
};

static NAMESPACE: TypeSchema =
    TypeSchema { fields: &[object("metadata", &OBJECT_META), object("status", &WORKLOAD_STATUS)] };

static NO_FIELDS: TypeSchema = TypeSchema { fields: &[] };

/// Kinds whose only merged lists are in their metadata (ConfigMap, EndpointSlice,
/// ResourceQuota, Event, and any kind without an entry).
static METADATA_ONLY: TypeSchema = TypeSchema { fields: &[object("metadata", &OBJECT_META)] };

/// The schema of a served kind, by its `kind` name.
pub fn kind_schema(kind: &str) -> &'static TypeSchema {
    match kind {
        "Pod" => &POD,
        "PodTemplate" => &POD_TEMPLATE,
        "Deployment" => &DEPLOYMENT,
        "ReplicaSet" => &REPLICA_SET,
        "Service" => &SERVICE,
        "Node" => &NODE,
        "Namespace" => &NAMESPACE,
        _ => &METADATA_ONLY,
    }
}

static POD_TEMPLATE: TypeSchema = TypeSchema {
    fields: &[object("metadata", &OBJECT_META), object("template", &POD_TEMPLATE_SPEC)],
};

#[cfg(test)]
mod tests {
    use super::{ListType, PatchStrategy, kind_schema};

    #[test]
    fn deployment_containers_merge_by_name_and_their_ports_by_container_port() {
        let spec = kind_schema("Deployment").child("spec").unwrap();
        let pod_spec = spec.child("template").unwrap().child("spec").unwrap();
        let containers = pod_spec.field("containers").unwrap();
        assert_eq!(containers.strategy, PatchStrategy::MergeByKey("name"));
        let ports = containers.schema.unwrap().field("ports").unwrap();
        assert_eq!(ports.strategy, PatchStrategy::MergeByKey("containerPort"));
        assert_eq!(ports.list_type, ListType::Map(&["containerPort", "protocol"]));
    }

    #[test]
    fn unlisted_fields_and_kinds_fall_back_to_replacement() {
        let pod_spec = kind_schema("Pod").child("spec").unwrap();
        assert!(pod_spec.field("tolerations").is_none());
        let config_map = kind_schema("ConfigMap");
        assert!(config_map.child("metadata").unwrap().field("finalizers").is_some());
        assert!(config_map.field("data").is_none());
    }
}
