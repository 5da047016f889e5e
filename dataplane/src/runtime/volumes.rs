//! A pod's volumes on the node, and what each container mounts of them.
//!
//! ```text
//! <pod dir>/volumes/empty-dir/<name>/   emptyDir: one directory per pod, shared by its
//!                                        containers, kept across their restarts, removed
//!                                        with the pod; a tmpfs for `medium: Memory`
//! <pod dir>/volumes/config-map/<name>/  configMap: one file per key (or per `items` entry)
//!     ..<timestamp>/                     the files of one version of the ConfigMap
//!     ..data -> ..<timestamp>            swapped atomically (rename(2)) on every change
//!     <key> -> ..data/<key>              what the container reads
//! ```
//!
//! `hostPath` volumes are the node's own paths, checked against their `type` (and made for
//! `DirectoryOrCreate` and `FileOrCreate`). The layout of `configMap` volumes is Kubernetes'
//! (its `AtomicWriter`), so that a container that reads through `<key>` always sees one whole
//! version, and a change reaches running containers without a restart (a `subPath` mount
//! keeps the version it was started with, as in Kubernetes).

use std::{
    collections::BTreeMap,
    fs, io,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Component, Path, PathBuf},
};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Volume};

use super::{env::Environment, mounts::MountRequest};

/// Why a pod's volumes cannot be set up: shown as the container's waiting message and as a
/// `FailedMount` event, as the kubelet reports `MountVolume.SetUp failed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeError {
    pub volume: String,
    pub message: String,
}

impl std::fmt::Display for VolumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MountVolume.SetUp failed for volume {:?} : {}", self.volume, self.message)
    }
}

/// Where a volume's content is on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumePath {
    pub path: PathBuf,
    /// Whether containers may write it (a `configMap` volume is always mounted read-only).
    pub writable: bool,
}

const EMPTY_DIR: &str = "empty-dir";
const CONFIG_MAP: &str = "config-map";
/// The symlink that points at the current version of a `configMap` volume.
const DATA_LINK: &str = "..data";
/// The mode of `configMap` files when neither `items[].mode` nor `defaultMode` says.
const DEFAULT_MODE: u32 = 0o644;

fn volume_dir(pod_dir: &Path, kind: &str, name: &str) -> PathBuf {
    pod_dir.join("volumes").join(kind).join(name)
}

/// Whether `relative` is a relative path without `..` (`items[].path`, `subPath`).
pub fn is_safe_relative(relative: &str) -> bool {
    !relative.is_empty()
        && Path::new(relative)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// The files of a `configMap` volume: relative path → (content, mode).
pub type ConfigMapFiles = BTreeMap<String, (Vec<u8>, u32)>;

/// What a `configMap` volume holds for `config_map` (`None`: it does not exist).
pub fn config_map_files(
    volume: &k8s_openapi::api::core::v1::ConfigMapVolumeSource,
    config_map: Option<&ConfigMap>,
) -> Result<ConfigMapFiles, String> {
    let optional = volume.optional == Some(true);
    let Some(config_map) = config_map else {
        return if optional {
            Ok(ConfigMapFiles::new())
        } else {
            Err(format!("configmap \"{}\" not found", volume.name))
        };
    };
    let default_mode = volume.default_mode.map_or(DEFAULT_MODE, |m| (m as u32) & 0o777);
    let mut content: BTreeMap<&str, &[u8]> = BTreeMap::new();
    for (key, value) in config_map.data.iter().flatten() {
        content.insert(key, value.as_bytes());
    }
    for (key, value) in config_map.binary_data.iter().flatten() {
        content.insert(key, &value.0);
    }
    let mut files = ConfigMapFiles::new();
    match &volume.items {
        Some(items) if !items.is_empty() => {
            for item in items {
                let Some(bytes) = content.get(item.key.as_str()) else {
                    if optional {
                        continue;
                    }
                    return Err(format!(
                        "configmap references non-existent config key: {}",
                        item.key
                    ));
                };
                if !is_safe_relative(&item.path) {
                    return Err(format!(
                        "items path {:?} must be relative without '..'",
                        item.path
                    ));
                }
                let mode = item.mode.map_or(default_mode, |m| (m as u32) & 0o777);
                files.insert(item.path.clone(), (bytes.to_vec(), mode));
            }
        }
        _ => {
            for (key, bytes) in content {
                files.insert(key.to_owned(), (bytes.to_vec(), default_mode));
            }
        }
    }
    Ok(files)
}

/// The files a `configMap` volume directory currently shows (through `..data`).
fn current_files(dir: &Path) -> Option<ConfigMapFiles> {
    let data = dir.join(DATA_LINK);
    fs::symlink_metadata(&data).ok()?;
    let mut files = ConfigMapFiles::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        for entry in fs::read_dir(data.join(&relative)).ok()? {
            let entry = entry.ok()?;
            let path = relative.join(entry.file_name());
            let meta = entry.metadata().ok()?;
            if meta.is_dir() {
                pending.push(path);
            } else {
                let bytes = fs::read(entry.path()).ok()?;
                files.insert(
                    path.to_string_lossy().into_owned(),
                    (bytes, meta.permissions().mode() & 0o777),
                );
            }
        }
    }
    Some(files)
}

/// Makes `dir` show `files`, atomically: a new version directory, then `..data` swapped to it
/// by rename(2), then the top-level links, then the old version removed. Returns whether
/// anything changed (an equal version is left alone).
pub fn write_config_map_volume(dir: &Path, files: &ConfigMapFiles) -> io::Result<bool> {
    if current_files(dir).as_ref() == Some(files) {
        return Ok(false);
    }
    fs::create_dir_all(dir)?;
    let stamp =
        format!("..{}", k8s_openapi::jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S.%f"));
    let version = dir.join(&stamp);
    fs::create_dir(&version)?;
    for (relative, (bytes, mode)) in files {
        let path = version.join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, bytes)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
    }
    let previous = fs::read_link(dir.join(DATA_LINK)).ok();
    let staged = dir.join("..data_tmp");
    let _ = fs::remove_file(&staged);
    symlink(&stamp, &staged)?;
    fs::rename(&staged, dir.join(DATA_LINK))?;
    // Top-level entries: a link per first path component, through `..data`.
    let wanted: std::collections::BTreeSet<String> = files
        .keys()
        .filter_map(|p| Path::new(p).components().next())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for name in &wanted {
        let link = dir.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA_LINK).join(name), &link)?;
        }
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !wanted.contains(&name) {
            fs::remove_file(entry.path())?;
        }
    }
    if let Some(previous) = previous.filter(|p| p != Path::new(&stamp)) {
        fs::remove_dir_all(dir.join(previous))?;
    }
    Ok(true)
}

/// Checks (and for the `…OrCreate` types makes) a `hostPath` as Kubernetes' `type` says.
pub fn check_host_path(path: &Path, kind: &str) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let meta = fs::metadata(path);
    let is = |test: fn(&fs::Metadata) -> bool| meta.as_ref().is_ok_and(test);
    let missing = || format!("hostPath type check failed: {} does not exist", path.display());
    match kind {
        "" => Ok(()),
        "DirectoryOrCreate" if meta.is_err() => {
            fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
            fs::set_permissions(path, fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("setting the mode of {}: {e}", path.display()))
        }
        "FileOrCreate" if meta.is_err() => {
            // As Kubernetes: the parent directory must exist already.
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(drop)
                .map_err(|e| format!("creating {}: {e}", path.display()))
        }
        "Directory" | "DirectoryOrCreate" if is(fs::Metadata::is_dir) => Ok(()),
        "File" | "FileOrCreate" if is(fs::Metadata::is_file) => Ok(()),
        "Socket" if is(|m| m.file_type().is_socket()) => Ok(()),
        "CharDevice" if is(|m| m.file_type().is_char_device()) => Ok(()),
        "BlockDevice" if is(|m| m.file_type().is_block_device()) => Ok(()),
        "Directory" | "File" | "Socket" | "CharDevice" | "BlockDevice" if meta.is_err() => {
            Err(missing())
        }
        "Directory" | "DirectoryOrCreate" => {
            Err(format!("hostPath type check failed: {} is not a directory", path.display()))
        }
        "File" | "FileOrCreate" => {
            Err(format!("hostPath type check failed: {} is not a file", path.display()))
        }
        "Socket" | "CharDevice" | "BlockDevice" => Err(format!(
            "hostPath type check failed: {} is not a {}",
            path.display(),
            kind.to_lowercase().replace("device", " device")
        )),
        other => Err(format!("hostPath type {other:?} is not supported")),
    }
}

/// The tmpfs options of a `medium: Memory` emptyDir: its `sizeLimit`, if any.
fn tmpfs_options(volume: &Volume) -> Result<String, String> {
    let mut options = "mode=777".to_owned();
    let limit = volume.empty_dir.as_ref().and_then(|e| e.size_limit.as_ref());
    if let Some(limit) = limit {
        let bytes = strait_controlplane::api::quantity::scaled(&limit.0, 1.0)
            .ok_or_else(|| format!("sizeLimit {:?} is not a quantity", limit.0))?;
        options.push_str(&format!(",size={bytes}"));
    }
    Ok(options)
}

fn is_mount_point(dir: &Path) -> bool {
    mounts_below(dir).iter().any(|m| m == dir)
}

/// Mount points at or below `dir`, from `/proc/self/mountinfo`, deepest last.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        // mountinfo escapes spaces and such as octal (`\040`); strait's paths have none.
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir))
        .collect();
    found.sort_by_key(|p| p.components().count());
    found
}

/// Unmounts everything mounted at or below `dir` (`medium: Memory` emptyDirs), deepest first,
/// so that the directory can be removed. Also used by `strait lab down`.
pub fn unmount_all_below(dir: &Path) -> io::Result<()> {
    for point in mounts_below(dir).iter().rev() {
        nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("unmounting {}: {e}", point.display()),
            )
        })?;
    }
    Ok(())
}

/// Makes every volume of `pod` exist under `pod_dir` (idempotent: a restart of the agent or of
/// a container finds them as they were) and brings `configMap` volumes up to date. Returns the
/// volumes by name, or why one cannot be set up.
pub fn prepare(
    pod: &Pod,
    pod_dir: &Path,
    config_map: &dyn Fn(&str) -> Option<std::sync::Arc<ConfigMap>>,
) -> Result<BTreeMap<String, VolumePath>, VolumeError> {
    let mut paths = BTreeMap::new();
    for volume in pod.spec.as_ref().and_then(|s| s.volumes.as_ref()).into_iter().flatten() {
        let failed = |message: String| VolumeError { volume: volume.name.clone(), message };
        let path = if let Some(empty_dir) = &volume.empty_dir {
            let dir = volume_dir(pod_dir, EMPTY_DIR, &volume.name);
            let created = !dir.exists();
            fs::create_dir_all(&dir)
                .map_err(|e| failed(format!("creating {}: {e}", dir.display())))?;
            if created {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))
                    .map_err(|e| failed(format!("setting the mode of {}: {e}", dir.display())))?;
            }
            if empty_dir.medium.as_deref() == Some("Memory") && !is_mount_point(&dir) {
                let options = tmpfs_options(volume).map_err(failed)?;
                nix::mount::mount(
                    Some("tmpfs"),
                    &dir,
                    Some("tmpfs"),
                    nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                    Some(options.as_str()),
                )
                .map_err(|e| failed(format!("mounting a tmpfs on {}: {e}", dir.display())))?;
            }
            VolumePath { path: dir, writable: true }
        } else if let Some(host_path) = &volume.host_path {
            let path = PathBuf::from(&host_path.path);
            check_host_path(&path, host_path.type_.as_deref().unwrap_or_default())
                .map_err(failed)?;
            VolumePath { path, writable: true }
        } else if let Some(source) = &volume.config_map {
            let dir = volume_dir(pod_dir, CONFIG_MAP, &volume.name);
            let found = config_map(&source.name);
            let files = config_map_files(source, found.as_deref()).map_err(failed)?;
            write_config_map_volume(&dir, &files)
                .map_err(|e| failed(format!("writing {}: {e}", dir.display())))?;
            VolumePath { path: dir, writable: false }
        } else {
            return Err(failed(
                "only emptyDir, hostPath and configMap volumes are supported by strait".to_owned(),
            ));
        };
        paths.insert(volume.name.clone(), path);
    }
    Ok(paths)
}

/// The mounts of one container: each `volumeMount` with its volume's path (and `subPath`, or
/// `subPathExpr` expanded with the container's environment). A `subPath` missing in a
/// writable volume is made as a directory, as the kubelet does.
pub fn container_mounts(
    container: &Container,
    volumes: &BTreeMap<String, VolumePath>,
    env: &Environment,
) -> Result<Vec<MountRequest>, String> {
    let mut requests = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = volumes
            .get(&mount.name)
            .ok_or_else(|| format!("volumeMount {:?} names no volume of the pod", mount.name))?;
        let sub_path = match (&mount.sub_path, &mount.sub_path_expr) {
            (Some(sub), _) if !sub.is_empty() => Some(sub.clone()),
            (_, Some(expr)) if !expr.is_empty() => Some(super::env::expand(expr, env)),
            _ => None,
        };
        let source = match &sub_path {
            Some(sub) if !is_safe_relative(sub) => {
                return Err(format!("subPath {sub:?} must be relative without '..'"));
            }
            Some(sub) => {
                let source = volume.path.join(sub);
                if volume.writable && fs::symlink_metadata(&source).is_err() {
                    fs::create_dir_all(&source)
                        .map_err(|e| format!("creating subPath {}: {e}", source.display()))?;
                }
                // A subPath of a configMap volume is its file as of now (Kubernetes: not
                // updated later); resolve the links so the mount holds that version.
                fs::canonicalize(&source)
                    .map_err(|e| format!("subPath {sub:?} of volume {:?}: {e}", mount.name))?
            }
            None => volume.path.clone(),
        };
        let source_is_dir = fs::metadata(&source).map(|m| m.is_dir()).unwrap_or(true);
        requests.push(MountRequest {
            source,
            target: PathBuf::from(&mount.mount_path),
            read_only: mount.read_only == Some(true) || !volume.writable,
            source_is_dir,
        });
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt, path::Path};

    use k8s_openapi::api::core::v1::{ConfigMap, ConfigMapVolumeSource};
    use serde_json::json;

    use super::{check_host_path, config_map_files, write_config_map_volume};

    fn source(value: serde_json::Value) -> ConfigMapVolumeSource {
        serde_json::from_value(value).unwrap()
    }

    fn config_map() -> ConfigMap {
        serde_json::from_value(json!({
            "metadata": {"name": "app"},
            "data": {"app.conf": "mode=fast\n", "level": "3"},
            "binaryData": {"logo": "AAEC"},
        }))
        .unwrap()
    }

    fn temp(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("strait-volumes-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_config_map_volume_has_a_file_per_key_or_per_item_with_its_mode() {
        let all = config_map_files(&source(json!({"name": "app"})), Some(&config_map())).unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["app.conf", "level", "logo"]);
        assert_eq!(all["logo"], (vec![0, 1, 2], 0o644));
        let items = source(json!({"name": "app", "defaultMode": 0o600, "items": [
            {"key": "app.conf", "path": "conf/app.conf"},
            {"key": "level", "path": "level.txt", "mode": 0o400},
        ]}));
        let some = config_map_files(&items, Some(&config_map())).unwrap();
        assert_eq!(some["conf/app.conf"].1, 0o600);
        assert_eq!(some["level.txt"], (b"3".to_vec(), 0o400));

        let missing_key = source(json!({"name": "app", "items": [{"key": "nope", "path": "x"}]}));
        assert_eq!(
            config_map_files(&missing_key, Some(&config_map())).unwrap_err(),
            "configmap references non-existent config key: nope"
        );
        assert_eq!(
            config_map_files(&source(json!({"name": "app"})), None).unwrap_err(),
            "configmap \"app\" not found"
        );
        let optional = source(json!({"name": "app", "optional": true}));
        assert!(config_map_files(&optional, None).unwrap().is_empty());
    }

    #[test]
    fn a_new_version_replaces_the_old_one_atomically_through_the_data_link() {
        let dir = temp("atomic");
        let first = config_map_files(&source(json!({"name": "app"})), Some(&config_map())).unwrap();
        assert!(write_config_map_volume(&dir, &first).unwrap());
        assert_eq!(fs::read_to_string(dir.join("app.conf")).unwrap(), "mode=fast\n");
        assert_eq!(fs::read_link(dir.join("level")).unwrap(), Path::new("..data/level"));
        let version = fs::read_link(dir.join("..data")).unwrap();
        assert!(!write_config_map_volume(&dir, &first).unwrap(), "the same version stays");

        let mut changed = config_map();
        changed.data = Some([("level".to_owned(), "4".to_owned())].into());
        changed.binary_data = None;
        let second = config_map_files(&source(json!({"name": "app"})), Some(&changed)).unwrap();
        assert!(write_config_map_volume(&dir, &second).unwrap());
        assert_eq!(fs::read_to_string(dir.join("level")).unwrap(), "4");
        assert!(!dir.join("app.conf").exists(), "a removed key's link goes");
        assert!(!dir.join(&version).exists(), "the old version is removed");
        let mode = fs::metadata(dir.join("level")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_paths_are_checked_against_their_type_and_made_for_or_create() {
        let dir = temp("hostpath");
        fs::create_dir_all(&dir).unwrap();
        let sub = dir.join("made");
        assert!(check_host_path(&sub, "Directory").unwrap_err().contains("does not exist"));
        check_host_path(&sub, "DirectoryOrCreate").unwrap();
        assert!(sub.is_dir());
        check_host_path(&sub, "Directory").unwrap();
        assert!(check_host_path(&sub, "File").unwrap_err().contains("is not a file"));
        let file = dir.join("file");
        check_host_path(&file, "FileOrCreate").unwrap();
        check_host_path(&file, "File").unwrap();
        assert!(check_host_path(&file, "Directory").unwrap_err().contains("is not a directory"));
        assert!(check_host_path(&file, "Socket").unwrap_err().contains("is not a socket"));
        assert!(check_host_path(&dir.join("no/parent"), "FileOrCreate").is_err());
        check_host_path(&dir.join("anything"), "").unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
