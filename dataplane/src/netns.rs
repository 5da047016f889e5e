//! Named network namespaces, kept the way iproute2 keeps them: the namespace file
//! bind-mounted at `/run/netns/<name>`, so `ip netns`, `ip -n` and `nsenter` all see them.
//!
//! Work inside a namespace runs on a short-lived thread that joins it with `setns(2)`; the
//! calling thread never changes namespace. Sockets keep the namespace they were opened in, so a
//! netlink socket opened on such a thread keeps talking to that namespace afterwards.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};

/// Where named namespaces live, as iproute2 defines it.
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
#[error("{action} network namespace {name}")]
pub struct NetNsError {
    action: &'static str,
    name: String,
    #[source]
    source: io::Error,
}

impl NetNsError {
    fn new(action: &'static str, name: &str, source: impl Into<io::Error>) -> Self {
        Self { action, name: name.to_owned(), source: source.into() }
    }

    /// The underlying OS error, for callers that map errors to exit codes.
    pub fn io_error(&self) -> &io::Error {
        &self.source
    }
}

/// An open network namespace. Holding it keeps the namespace alive even if its name is removed.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    file: File,
}

impl NetNs {
    /// Creates the named namespace with its loopback still down. Fails if the name exists.
    pub fn create(name: &str) -> Result<Self, NetNsError> {
        validate_name(name).map_err(|e| NetNsError::new("naming", name, e))?;
        prepare_run_dir().map_err(|e| NetNsError::new("preparing /run/netns for", name, e))?;
        let path = named_path(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| NetNsError::new("creating the mount point of", name, e))?;

        let bind_target = path.clone();
        let made = std::thread::spawn(move || -> io::Result<()> {
            // This thread alone moves into the new namespace; it ends right after.
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &bind_target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")));
        if let Err(e) = made {
            let _ = fs::remove_file(&path);
            return Err(NetNsError::new("creating", name, e));
        }
        Self::open(name)
    }

    /// Opens an existing named namespace.
    pub fn open(name: &str) -> Result<Self, NetNsError> {
        validate_name(name).map_err(|e| NetNsError::new("naming", name, e))?;
        let file = File::open(named_path(name)).map_err(|e| NetNsError::new("opening", name, e))?;
        Ok(Self { name: name.to_owned(), file })
    }

    /// Opens a namespace by path (`CNI_NETNS`, `/proc/<pid>/ns/net`, a bind mount anywhere).
    pub fn open_path(path: &Path) -> Result<Self, NetNsError> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| NetNsError::new("opening", &name, e))?;
        Ok(Self { name, file })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetNsError> {
        Self::open_path(Path::new("/proc/thread-self/ns/net"))
    }

    /// Removes the named namespace. Succeeds when it does not exist. Processes or sockets still
    /// inside keep it alive; its name is gone either way.
    pub fn delete(name: &str) -> Result<(), NetNsError> {
        validate_name(name).map_err(|e| NetNsError::new("naming", name, e))?;
        let path = named_path(name);
        match umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(NetNsError::new("unmounting", name, e)),
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NetNsError::new("removing", name, e)),
        }
    }

    /// Whether a namespace of this name exists.
    pub fn exists(name: &str) -> bool {
        validate_name(name).is_ok() && named_path(name).exists()
    }

    /// Names of the named namespaces that start with `prefix`.
    pub fn list_with_prefix(prefix: &str) -> io::Result<Vec<String>> {
        let entries = match fs::read_dir(NETNS_RUN_DIR) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path other processes can open (`ip netns exec`, `CNI_NETNS`).
    pub fn path(&self) -> PathBuf {
        named_path(&self.name)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `work` on a thread inside this namespace and returns its result. `work` never runs
    /// if joining the namespace fails, so nothing meant for this namespace lands in another.
    pub fn run<T, F>(&self, work: F) -> Result<T, NetNsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(|e| NetNsError::new("entering", &self.name, e))?;
                    Ok(work())
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(NetNsError::new(
                        "running work in",
                        &self.name,
                        io::Error::other("panicked"),
                    ))
                })
        })
    }

    /// A netlink handle whose socket lives in this namespace. Needs a tokio runtime: the
    /// connection task is spawned on the current one.
    pub fn netlink(&self) -> Result<rtnetlink::Handle, NetNsError> {
        let runtime = tokio::runtime::Handle::current();
        let (connection, handle) = self
            .run(|| {
                let _entered = runtime.enter();
                rtnetlink::new_connection().map(|(connection, handle, _)| (connection, handle))
            })?
            .map_err(|e| NetNsError::new("opening a netlink socket in", &self.name, e))?;
        tokio::spawn(connection);
        Ok(handle)
    }

    /// Writes a sysctl under `/proc/sys/net/` as seen from inside this namespace, e.g.
    /// `ipv4/ip_forward`. Per-namespace sysctls only: never reaches the root namespace.
    pub fn write_net_sysctl(&self, key: &str, value: &str) -> Result<(), NetNsError> {
        let path = format!("/proc/sys/net/{key}");
        self.run(|| fs::write(&path, value))?
            .map_err(|e| NetNsError::new("writing net sysctl in", &self.name, e))
    }
}

/// The path of a named namespace.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn validate_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() > 255 || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad namespace name {name:?}"),
        ));
    }
    Ok(())
}

/// Makes `/run/netns` a shared mount point, as `ip netns add` does, so namespace mounts made
/// here propagate to mount namespaces created later (pods get their own for resolv.conf).
fn prepare_run_dir() -> io::Result<()> {
    fs::create_dir_all(NETNS_RUN_DIR)?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match mount(None::<&str>, NETNS_RUN_DIR, None::<&str>, shared, None::<&str>) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            // Not a mount point yet: bind it onto itself first.
            mount(
                Some(NETNS_RUN_DIR),
                NETNS_RUN_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            mount(None::<&str>, NETNS_RUN_DIR, None::<&str>, shared, None::<&str>)?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
