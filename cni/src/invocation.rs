//! The `CNI_*` environment variables a runtime sets when it execs the plugin (CNI spec
//! §"Parameters"), checked per verb as §"CNI operations" requires.

use std::path::PathBuf;

use crate::error::CniError;

/// What the runtime asks for in `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Verb {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "ADD" => Some(Self::Add),
            "DEL" => Some(Self::Del),
            "CHECK" => Some(Self::Check),
            "STATUS" => Some(Self::Status),
            "GC" => Some(Self::Gc),
            "VERSION" => Some(Self::Version),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }
}

/// One attachment of a container to the network: the spec's primary key for plugin state
/// (§"General considerations": network name, container ID, interface name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// A validated invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub verb: Verb,
    /// Set for ADD, DEL and CHECK.
    pub attachment: Option<Attachment>,
    /// Required for ADD and CHECK, optional for DEL (the namespace may be gone).
    pub netns: Option<PathBuf>,
}

impl Invocation {
    /// Reads and checks the variables through `lookup` (the process environment in the
    /// binary, a map in tests). Empty values count as unset, as runtimes clear them that way.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let get = |name: &str| lookup(name).filter(|value| !value.is_empty());
        let command = get("CNI_COMMAND").ok_or_else(|| CniError::InvalidEnvironment {
            variable: "CNI_COMMAND",
            problem: "is not set: it must be one of ADD, DEL, CHECK, STATUS, GC, VERSION"
                .to_owned(),
        })?;
        let verb = Verb::parse(&command).ok_or_else(|| CniError::InvalidEnvironment {
            variable: "CNI_COMMAND",
            problem: format!(
                "is {command:?}: it must be one of ADD, DEL, CHECK, STATUS, GC, VERSION"
            ),
        })?;

        // §"CNI operations": ADD and CHECK require CNI_CONTAINERID, CNI_NETNS and CNI_IFNAME;
        // DEL requires all but CNI_NETNS; STATUS and VERSION need none; GC requires CNI_PATH.
        let needs_attachment = matches!(verb, Verb::Add | Verb::Del | Verb::Check);
        let needs_netns = matches!(verb, Verb::Add | Verb::Check);
        let attachment = if needs_attachment {
            let container_id = require(&get, "CNI_CONTAINERID", verb)?;
            validate_container_id(&container_id)?;
            let ifname = require(&get, "CNI_IFNAME", verb)?;
            validate_ifname(&ifname)?;
            Some(Attachment { container_id, ifname })
        } else {
            None
        };
        let netns = if needs_netns {
            Some(PathBuf::from(require(&get, "CNI_NETNS", verb)?))
        } else if verb == Verb::Del {
            get("CNI_NETNS").map(PathBuf::from)
        } else {
            None
        };
        if verb == Verb::Gc {
            require(&get, "CNI_PATH", verb)?;
        }
        Ok(Self { verb, attachment, netns })
    }
}

fn require(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    verb: Verb,
) -> Result<String, CniError> {
    get(variable).ok_or_else(|| CniError::InvalidEnvironment {
        variable,
        problem: format!("is not set, and {} needs it", verb.as_str()),
    })
}

/// §"Parameters": a container ID starts with an alphanumeric character, followed by
/// alphanumerics, `_`, `.` or `-`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if starts_well && rest_ok {
        Ok(())
    } else {
        Err(CniError::InvalidEnvironment {
            variable: "CNI_CONTAINERID",
            problem: format!(
                "is {id:?}: it must start with a letter or digit and contain only letters, \
                 digits, '_', '.' and '-'"
            ),
        })
    }
}

/// §"Parameters": an interface name is a valid Linux name: not empty, not `.` or `..`, shorter
/// than 16 bytes (IFNAMSIZ with its NUL), without `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad_char = name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if name.is_empty() || name == "." || name == ".." || name.len() > 15 || bad_char {
        return Err(CniError::InvalidEnvironment {
            variable: "CNI_IFNAME",
            problem: format!(
                "is {name:?}: an interface name has 1 to 15 bytes, is not '.' or '..', and \
                 contains no '/', ':' or whitespace"
            ),
        });
    }
    Ok(())
}
