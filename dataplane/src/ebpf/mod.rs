//! strait's eBPF programs as the node uses them: embedded objects, loaded once by the agent,
//! pinned under `/sys/fs/bpf/strait/<cluster>/<node>/`, re-adopted when the agent restarts, and
//! attached per interface by the CNI plugin from those pins.

pub mod antispoof;
pub mod lb;

use std::path::{Path, PathBuf};

/// Root of every pin strait makes.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/strait";

/// `/sys/fs/bpf/strait/<cluster>/<node>`: the pins of one node agent.
///
/// bpffs refuses names with a dot (EPERM), and node names are often DNS names
/// (`worker-1.example.net`): dots become `_`, which a DNS name cannot contain, so two nodes
/// never map to the same directory.
pub fn node_pin_dir(cluster: &str, node: &str) -> PathBuf {
    Path::new(BPFFS_ROOT).join(cluster.replace('.', "_")).join(node.replace('.', "_"))
}

#[cfg(test)]
mod tests {
    use super::node_pin_dir;

    #[test]
    fn pin_directories_of_dns_named_nodes_have_no_dots() {
        let dir = node_pin_dir("prod", "worker-1.example.net");
        assert_eq!(dir.to_str(), Some("/sys/fs/bpf/strait/prod/worker-1_example_net"));
        assert_ne!(node_pin_dir("c", "a.b"), node_pin_dir("c", "a-b"));
    }
}

/// The embedded object of the pod-veth tc programs (anti-spoofing and service NAT), built by
/// `build.rs` from `ebpf/`.
pub(crate) static ANTISPOOF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/strait-antispoof"));

/// The embedded object of the socket-level load balancer (cgroup sock_addr hooks).
pub(crate) static SOCK_LB_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/strait-sock-lb"));

/// Loads one embedded object with its maps pinned in `pin_dir` (created if needed): maps
/// already pinned there are re-adopted as they are, new ones get the capacities of `sizes`.
pub(crate) fn load_object(
    pin_dir: &Path,
    sizes: &lb::LbMapSizes,
    object: &[u8],
    what: &str,
) -> Result<aya::Ebpf, EbpfError> {
    crate::dirs::create_dir_all_shared(pin_dir).map_err(|source| EbpfError::Io {
        action: format!("creating pin directory {}", pin_dir.display()),
        source,
    })?;
    let mut loader = aya::EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    sizes.apply(&mut loader);
    loader.load(object).map_err(|source| EbpfError::Load {
        action: format!("loading {what}"),
        source: Box::new(source),
    })
}

/// Pins a loaded program at `pin_dir/pin`, replacing an older pin atomically: `pin_at` pins
/// it under a staging name first, which rename(2) then moves over the old one, so a reader of
/// the pin never finds it missing. bpffs refuses names with a dot (EPERM: dots are reserved
/// for the kernel's own entries, kernel/bpf/inode.c), so the staging name uses `_staged`.
pub(crate) fn pin_replacing(
    pin_dir: &Path,
    pin: &str,
    what: &str,
    pin_at: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), EbpfError> {
    let staged = pin_dir.join(format!("{pin}_staged"));
    let _ = std::fs::remove_file(&staged);
    pin_at(&staged).map_err(|source| EbpfError::Pin {
        action: format!("pinning {what} at {}", staged.display()),
        source,
    })?;
    let pinned = pin_dir.join(pin);
    std::fs::rename(&staged, &pinned).map_err(|source| EbpfError::Io {
        action: format!("moving the program pin to {}", pinned.display()),
        source,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("{action}")]
    Load {
        action: String,
        // Boxed: aya's load error is large enough to bloat every Result that carries it.
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("{action}")]
    Program {
        action: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{action}")]
    Map {
        action: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{action}")]
    Pin {
        action: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{action}")]
    Link {
        action: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// A request the loader refuses by policy, e.g. hooking the root cgroup.
    #[error("{0}")]
    Refused(String),
    #[error("{action}")]
    Tc {
        action: String,
        #[source]
        source: aya::programs::tc::TcError,
    },
}

/// Makes sure a bpf filesystem is mounted at `/sys/fs/bpf`.
pub fn ensure_bpffs() -> Result<(), EbpfError> {
    let io = |action: &str, source| EbpfError::Io { action: action.to_owned(), source };
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| io("reading /proc/self/mounts", e))?;
    if mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next();
        fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    }) {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").map_err(|e| io("creating /sys/fs/bpf", e))?;
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| io("mounting the bpf filesystem at /sys/fs/bpf", e.into()))
}
