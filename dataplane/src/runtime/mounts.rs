//! Where a container's volumes appear: its `volumeMounts`, planned against the node's file
//! tree, which is the container's file tree too (strait runs host executables, see `image.rs`).
//!
//! Every mount is made in the container's own mount namespace, so the node never sees it. A
//! `mountPath` that exists on the node is mounted over. One that does not exist must not be
//! created on the node: the nearest existing directory above it is *scaffolded* instead, that
//! is, rebuilt in the container's namespace as a tmpfs holding a bind mount of each of its
//! entries, where the missing directories can then be made. A scaffold of `/` becomes the
//! container's root (pivot_root). Mounts are made parents first, and a mount point inside an
//! earlier mount is made inside that volume, as runc does.
//!
//! The plan is computed here from what the node's file tree holds ([`HostView`]), before the
//! container's process is forked; `process::ChildSetup` carries it out in the child.

use std::{
    collections::BTreeSet,
    io,
    path::{Component, Path, PathBuf},
};

/// What a path of the node is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    Dir,
    File,
    Symlink(PathBuf),
    /// A socket, FIFO or device: bind-mounted like a file.
    Other,
}

/// The node's file tree as the planner sees it (the real one, or a fake in tests).
pub trait HostView {
    /// What `path` is, without following a final symlink; `None` if it does not exist.
    fn kind(&self, path: &Path) -> Option<FileKind>;
    /// The entries of a directory.
    fn entries(&self, dir: &Path) -> io::Result<Vec<(String, FileKind)>>;
    /// The permission bits of a directory (a scaffold keeps them: `/tmp` stays 1777).
    fn mode(&self, dir: &Path) -> u32;
}

/// The node's own file tree.
pub struct NodeFiles;

impl HostView for NodeFiles {
    fn kind(&self, path: &Path) -> Option<FileKind> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        let kind = meta.file_type();
        Some(if kind.is_symlink() {
            FileKind::Symlink(std::fs::read_link(path).ok()?)
        } else if kind.is_dir() {
            FileKind::Dir
        } else if kind.is_file() {
            FileKind::File
        } else {
            FileKind::Other
        })
    }

    fn entries(&self, dir: &Path) -> io::Result<Vec<(String, FileKind)>> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(kind) = self.kind(&entry.path()) {
                entries.push((name, kind));
            }
        }
        entries.sort();
        Ok(entries)
    }

    fn mode(&self, dir: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir).map_or(0o755, |m| m.permissions().mode() & 0o7777)
    }
}

/// One mount a container asks for: a volume's directory or file on the node, and where the
/// container sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountRequest {
    pub source: PathBuf,
    /// `mountPath`: absolute (a relative one is taken from `/`).
    pub target: PathBuf,
    pub read_only: bool,
    /// Whether `source` is a directory (else a file, e.g. a `subPath` of a `configMap` key).
    pub source_is_dir: bool,
}

/// A directory of the node rebuilt on a tmpfs in the container's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scaffold {
    pub dir: PathBuf,
    /// Its entries, each bind-mounted (directories recursively) or, for symlinks, copied.
    pub entries: Vec<(String, FileKind)>,
    pub mode: u32,
}

/// One mount as it will be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedMount {
    pub source: PathBuf,
    /// The mount point with the node's symlinks resolved.
    pub target: PathBuf,
    pub read_only: bool,
    pub source_is_dir: bool,
    /// Directories to make first, parents first (they exist only in the container's view).
    pub make_dirs: Vec<PathBuf>,
    /// Whether the mount point itself must be made (a directory, or an empty file).
    pub make_target: bool,
}

/// Everything a container's mount namespace gets, in order: scaffolds deepest first (a
/// scaffold of `/` last), then the mounts, parents first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountPlan {
    pub scaffolds: Vec<Scaffold>,
    pub mounts: Vec<PlannedMount>,
}

impl MountPlan {
    pub fn is_empty(&self) -> bool {
        self.scaffolds.is_empty() && self.mounts.is_empty()
    }

    /// Whether the container gets a root of its own (a scaffold of `/`).
    pub fn pivots_root(&self) -> bool {
        self.scaffolds.iter().any(|s| s.dir == Path::new("/"))
    }
}

/// `target` made absolute and free of `.`; `..` is refused (the API refuses it too).
fn normalize(target: &Path) -> Result<PathBuf, String> {
    let mut normalized = PathBuf::from("/");
    for component in target.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => normalized.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("mountPath {} may not contain '..'", target.display()));
            }
        }
    }
    if normalized == Path::new("/") {
        return Err("mountPath / would hide the whole node".to_owned());
    }
    Ok(normalized)
}

/// Where the node's tree resolves `path` to, following symlinks of existing components, and
/// the components that do not exist. A component below a planned mount is not looked up.
struct Resolved {
    existing: PathBuf,
    missing: Vec<std::ffi::OsString>,
    inside_mount: bool,
}

fn resolve(
    host: &dyn HostView,
    path: &Path,
    mounted: &BTreeSet<PathBuf>,
) -> Result<Resolved, String> {
    let mut parts: Vec<std::ffi::OsString> =
        path.components().skip(1).map(|c| c.as_os_str().to_owned()).collect();
    parts.reverse();
    let mut existing = PathBuf::from("/");
    let mut hops = 0;
    while let Some(part) = parts.pop() {
        if mounted.iter().any(|m| existing.starts_with(m)) {
            // Inside a volume planned before: what is below it is made inside it.
            parts.push(part);
            parts.reverse();
            return Ok(Resolved { existing, missing: parts, inside_mount: true });
        }
        let next = existing.join(&part);
        if mounted.contains(&next) {
            existing = next;
            continue;
        }
        match host.kind(&next) {
            Some(FileKind::Symlink(link)) => {
                hops += 1;
                if hops > 40 {
                    return Err(format!("too many symlinks resolving {}", path.display()));
                }
                let base = if link.is_absolute() { PathBuf::from("/") } else { existing.clone() };
                let mut followed: Vec<std::ffi::OsString> = Vec::new();
                for component in base.join(&link).components() {
                    match component {
                        Component::Normal(p) => followed.push(p.to_owned()),
                        Component::ParentDir => {
                            followed.pop();
                        }
                        _ => {}
                    }
                }
                existing = PathBuf::from("/");
                followed.reverse();
                parts.extend(followed);
            }
            Some(FileKind::Dir) => existing = next,
            Some(_) if parts.is_empty() => existing = next,
            Some(_) => return Err(format!("{} is not a directory", next.display())),
            None => {
                parts.push(part);
                parts.reverse();
                return Ok(Resolved { existing, missing: parts, inside_mount: false });
            }
        }
    }
    Ok(Resolved { existing, missing: Vec::new(), inside_mount: false })
}

/// Plans the mounts of one container.
pub fn plan(host: &dyn HostView, requests: &[MountRequest]) -> Result<MountPlan, String> {
    let mut requests: Vec<(PathBuf, &MountRequest)> =
        requests.iter().map(|r| normalize(&r.target).map(|t| (t, r))).collect::<Result<_, _>>()?;
    // Parents first; equal depths keep their order.
    requests.sort_by_key(|(target, _)| target.components().count());
    let mut mounted = BTreeSet::new();
    let mut scaffold_dirs = BTreeSet::new();
    let mut mounts = Vec::new();
    for (target, request) in requests {
        let resolved = resolve(host, &target, &mounted)?;
        let mut make_dirs = Vec::new();
        let mut path = resolved.existing.clone();
        let missing = resolved.missing.len();
        for (index, part) in resolved.missing.iter().enumerate() {
            path.push(part);
            if index + 1 < missing {
                make_dirs.push(path.clone());
            }
        }
        if missing > 0 && !resolved.inside_mount {
            scaffold_dirs.insert(resolved.existing.clone());
        }
        if missing == 0 {
            let is_dir = matches!(host.kind(&path), Some(FileKind::Dir));
            if is_dir != request.source_is_dir {
                return Err(format!(
                    "cannot mount a {} over the {} {}",
                    if request.source_is_dir { "directory" } else { "file" },
                    if is_dir { "directory" } else { "file" },
                    path.display()
                ));
            }
        }
        mounted.insert(path.clone());
        mounts.push(PlannedMount {
            source: request.source.clone(),
            target: path,
            read_only: request.read_only,
            source_is_dir: request.source_is_dir,
            make_dirs,
            make_target: missing > 0,
        });
    }
    // Deepest first, so that a shallower scaffold binds the deeper one already in place.
    let mut dirs: Vec<PathBuf> = scaffold_dirs.into_iter().collect();
    dirs.sort_by_key(|dir| std::cmp::Reverse(dir.components().count()));
    let scaffolds = dirs
        .into_iter()
        .map(|dir| {
            let entries =
                host.entries(&dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
            let mode = host.mode(&dir);
            Ok(Scaffold { dir, entries, mode })
        })
        .collect::<Result<_, String>>()?;
    Ok(MountPlan { scaffolds, mounts })
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        io,
        path::{Path, PathBuf},
    };

    use super::{FileKind, HostView, MountRequest, plan};

    /// A node tree: `/bin -> usr/bin`, `/etc/hosts`, `/tmp`, `/usr/bin`, `/mnt`.
    struct FakeTree(BTreeMap<PathBuf, FileKind>);

    impl FakeTree {
        fn new() -> Self {
            let mut tree = BTreeMap::new();
            for dir in ["/", "/etc", "/tmp", "/usr", "/usr/bin", "/mnt", "/var"] {
                tree.insert(PathBuf::from(dir), FileKind::Dir);
            }
            tree.insert("/etc/hosts".into(), FileKind::File);
            tree.insert("/bin".into(), FileKind::Symlink("usr/bin".into()));
            Self(tree)
        }
    }

    impl HostView for FakeTree {
        fn kind(&self, path: &Path) -> Option<FileKind> {
            self.0.get(path).cloned()
        }
        fn entries(&self, dir: &Path) -> io::Result<Vec<(String, FileKind)>> {
            Ok(self
                .0
                .iter()
                .filter(|(p, _)| p.parent() == Some(dir))
                .map(|(p, k)| (p.file_name().unwrap().to_string_lossy().into_owned(), k.clone()))
                .collect())
        }
        fn mode(&self, dir: &Path) -> u32 {
            if dir == Path::new("/tmp") { 0o1777 } else { 0o755 }
        }
    }

    fn request(target: &str, dir: bool) -> MountRequest {
        MountRequest {
            source: PathBuf::from("/vol").join(target.trim_start_matches('/')),
            target: target.into(),
            read_only: false,
            source_is_dir: dir,
        }
    }

    #[test]
    fn an_existing_mount_point_is_mounted_over_without_a_scaffold() {
        let planned =
            plan(&FakeTree::new(), &[request("/tmp", true), request("/etc/hosts", false)]).unwrap();
        assert!(planned.scaffolds.is_empty());
        assert_eq!(planned.mounts.len(), 2);
        assert!(planned.mounts.iter().all(|m| !m.make_target && m.make_dirs.is_empty()));
    }

    #[test]
    fn a_missing_mount_point_scaffolds_its_nearest_existing_directory_deepest_first() {
        let planned = plan(
            &FakeTree::new(),
            &[
                request("/data/cache", true),
                request("/etc/config", true),
                request("/tmp/x/y", true),
            ],
        )
        .unwrap();
        let dirs: Vec<&Path> = planned.scaffolds.iter().map(|s| s.dir.as_path()).collect();
        assert_eq!(dirs, [Path::new("/etc"), Path::new("/tmp"), Path::new("/")]);
        assert!(planned.pivots_root());
        assert_eq!(planned.scaffolds[1].mode, 0o1777, "a scaffold keeps the directory's mode");
        let root = &planned.scaffolds[2];
        assert!(root.entries.contains(&("bin".to_owned(), FileKind::Symlink("usr/bin".into()))));
        let data = planned.mounts.iter().find(|m| m.target == Path::new("/data/cache")).unwrap();
        assert_eq!(data.make_dirs, [PathBuf::from("/data")]);
        assert!(data.make_target);
    }

    #[test]
    fn mount_points_inside_an_earlier_volume_are_made_inside_it() {
        let planned =
            plan(&FakeTree::new(), &[request("/data/sub/deeper", true), request("/data", true)])
                .unwrap();
        assert_eq!(planned.mounts[0].target, Path::new("/data"), "parents first");
        assert_eq!(planned.scaffolds.len(), 1, "only / for /data itself");
        let inner = &planned.mounts[1];
        assert_eq!(inner.make_dirs, [PathBuf::from("/data/sub")]);
        assert!(inner.make_target);
    }

    #[test]
    fn symlinks_of_the_node_are_followed_and_wrong_kinds_and_backsteps_are_refused() {
        let planned = plan(&FakeTree::new(), &[request("/bin/tool", false)]).unwrap();
        assert_eq!(planned.mounts[0].target, Path::new("/usr/bin/tool"));
        assert_eq!(planned.scaffolds[0].dir, Path::new("/usr/bin"));
        assert!(!planned.pivots_root());

        let error = plan(&FakeTree::new(), &[request("/etc/hosts", true)]).unwrap_err();
        assert!(error.contains("cannot mount a directory over the file"), "{error}");
        let error = plan(&FakeTree::new(), &[request("/etc/hosts/x", true)]).unwrap_err();
        assert!(error.contains("/etc/hosts is not a directory"), "{error}");
        assert!(plan(&FakeTree::new(), &[request("/data/../etc", true)]).is_err());
        assert!(plan(&FakeTree::new(), &[request("/", true)]).is_err());
    }
}
