//! Container processes: how a container starts inside its pod's network namespace and cgroup,
//! and how its exit is noticed, also for processes adopted after an agent restart.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    process::Stdio,
};

use tokio::io::unix::AsyncFd;

use super::{
    logs::LogRotation,
    mounts::{FileKind, MountPlan},
};

/// Everything needed to start one container process.
#[derive(Debug)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    /// The pod's network namespace file (e.g. `/run/netns/strait-pod-<uid>`).
    pub netns_path: PathBuf,
    /// `cgroup.procs` of the container's cgroup.
    pub cgroup_procs: PathBuf,
    /// The pod's hostname (its name), set in the container's own UTS namespace.
    pub hostname: String,
    /// The live log file of this incarnation (see `logs.rs`), written by its log shim.
    pub log_path: PathBuf,
    pub log_rotation: LogRotation,
    /// `cgroup.procs` of the cgroup the log shim runs in.
    pub log_shim_cgroup_procs: PathBuf,
    /// The pod's own resolver configuration, bind-mounted over `/etc/resolv.conf` in a mount
    /// namespace of the container's own; `None` leaves the node's file.
    pub resolv_conf: Option<PathBuf>,
    /// The container's volume mounts (see `mounts.rs`), made in its own mount namespace.
    pub mounts: MountPlan,
    /// An empty directory of the node where scaffolds are built (needed when the plan has any).
    pub scaffold_dir: PathBuf,
}

/// What a new process joins between fork and exec, so that no instruction of the program runs
/// outside it: a cgroup, a session of its own, a network namespace, a UTS namespace with a
/// hostname, a mount namespace with its own `/etc/resolv.conf`. Everything is prepared
/// (opened, allocated, checked) before forking; [`ChildSetup::apply`] then makes only
/// async-signal-safe system calls.
#[derive(Debug, Default)]
pub struct ChildSetup {
    cgroup_procs: Option<CString>,
    new_session: bool,
    controlling_terminal: bool,
    netns: Option<File>,
    hostname: Option<CString>,
    /// A mount namespace of its own is made when there is anything to mount in it.
    mounts: Option<PreparedMounts>,
    resolv_conf: Option<FileBind>,
    /// An existing mount namespace to join instead (an exec probe joins its container's).
    join_mount_ns: Option<File>,
    working_dir: Option<CString>,
}

/// A [`MountPlan`] with every path turned into a C string before the fork.
#[derive(Debug)]
struct PreparedMounts {
    staging: CString,
    scaffolds: Vec<PreparedScaffold>,
    mounts: Vec<PreparedMount>,
}

#[derive(Debug)]
struct PreparedScaffold {
    dir: CString,
    /// `mode=<octal>` for the tmpfs.
    options: CString,
    pivot: bool,
    entries: Vec<PreparedEntry>,
}

#[derive(Debug)]
enum PreparedEntry {
    /// A directory made in the scaffold and the node's directory bound on it, recursively.
    Dir {
        at: CString,
        from: CString,
    },
    /// An empty file made in the scaffold and the node's file (or socket, FIFO…) bound on it.
    File {
        at: CString,
        from: CString,
    },
    Symlink {
        at: CString,
        to: CString,
    },
}

#[derive(Debug)]
struct PreparedMount {
    source: CString,
    target: CString,
    read_only: bool,
    make_dirs: Vec<CString>,
    /// Make the mount point itself: a directory (true) or an empty file (false).
    make_target: Option<bool>,
}

/// A file bind-mounted over another, both paths absolute and resolved before the fork.
#[derive(Debug)]
struct FileBind {
    source: CString,
    target: CString,
}

/// Where processes read their resolver configuration (resolv.conf(5)).
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

impl ChildSetup {
    pub fn new() -> Self {
        Self::default()
    }

    /// Joins the cgroup whose `cgroup.procs` is `procs`.
    pub fn join_cgroup(mut self, procs: &Path) -> io::Result<Self> {
        self.cgroup_procs = Some(
            CString::new(procs.as_os_str().as_bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        );
        Ok(self)
    }

    /// Starts a session of its own (no signal to the starter's group reaches it).
    pub fn new_session(mut self) -> Self {
        self.new_session = true;
        self
    }

    /// Makes the terminal on its stdin its controlling terminal (`kubectl exec -t`), so that
    /// the terminal's signals (^C, window changes) reach it. Needs a session of its own.
    pub fn controlling_terminal(mut self) -> Self {
        self.controlling_terminal = true;
        self
    }

    /// Enters the network namespace at `path`.
    pub fn enter_netns(mut self, path: &Path) -> io::Result<Self> {
        self.netns =
            Some(File::open(path).map_err(|e| {
                io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
            })?);
        Ok(self)
    }

    /// Gets a UTS namespace of its own with this hostname.
    pub fn hostname(mut self, name: &str) -> io::Result<Self> {
        self.hostname = Some(
            CString::new(name.as_bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        );
        Ok(self)
    }

    /// Gets a mount namespace of its own in which `file` is mounted, read-only, over
    /// `/etc/resolv.conf`. Its mounts are made private first, so neither this bind nor any
    /// later mount of the process propagates back to the node's mount namespace; the mount
    /// goes away with the last process of the namespace.
    ///
    /// If `/etc/resolv.conf` is a symlink (systemd-resolved's stub, for one), the bind lands on
    /// the file it resolves to, as mount(2) would follow it anyway: that file is hidden behind
    /// `file` inside the new namespace only. If the link is dangling or the file is missing,
    /// this fails here, before anything is started.
    ///
    /// The namespace starts as a copy of the node's mounts, `/run/netns/*` included. That does
    /// not pin other pods' network namespaces: removing a name (unlink of its mount point)
    /// detaches the copies in every other mount namespace too (Linux 3.18 and later).
    pub fn bind_resolv_conf(self, file: &Path) -> io::Result<Self> {
        self.bind_resolv_conf_over(file, Path::new(RESOLV_CONF))
    }

    /// Gets a mount namespace of its own (as for [`ChildSetup::bind_resolv_conf`]) in which
    /// `plan` is carried out; `staging` is an empty directory of the node where scaffolds are
    /// built. Nothing happens for an empty plan.
    pub fn mounts(mut self, plan: &MountPlan, staging: &Path) -> io::Result<Self> {
        if plan.is_empty() {
            return Ok(self);
        }
        let scaffolds = plan
            .scaffolds
            .iter()
            .map(|scaffold| {
                let entries = scaffold
                    .entries
                    .iter()
                    .map(|(name, kind)| {
                        let at = c_path(&staging.join(name))?;
                        let from = c_path(&scaffold.dir.join(name))?;
                        Ok(match kind {
                            FileKind::Dir => PreparedEntry::Dir { at, from },
                            FileKind::Symlink(to) => PreparedEntry::Symlink { at, to: c_path(to)? },
                            FileKind::File | FileKind::Other => PreparedEntry::File { at, from },
                        })
                    })
                    .collect::<io::Result<_>>()?;
                Ok(PreparedScaffold {
                    dir: c_path(&scaffold.dir)?,
                    options: CString::new(format!("mode={:o}", scaffold.mode))
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
                    pivot: scaffold.dir == Path::new("/"),
                    entries,
                })
            })
            .collect::<io::Result<_>>()?;
        let mounts = plan
            .mounts
            .iter()
            .map(|mount| {
                Ok(PreparedMount {
                    source: c_path(&mount.source)?,
                    target: c_path(&mount.target)?,
                    read_only: mount.read_only,
                    make_dirs: mount
                        .make_dirs
                        .iter()
                        .map(|d| c_path(d))
                        .collect::<io::Result<_>>()?,
                    make_target: mount.make_target.then_some(mount.source_is_dir),
                })
            })
            .collect::<io::Result<_>>()?;
        self.mounts = Some(PreparedMounts { staging: c_path(staging)?, scaffolds, mounts });
        Ok(self)
    }

    /// Joins the mount namespace at `path` (`/proc/<pid>/ns/mnt` of a container), which also
    /// makes that namespace's root the process's root.
    pub fn join_mount_namespace(mut self, path: &Path) -> io::Result<Self> {
        self.join_mount_ns =
            Some(File::open(path).map_err(|e| {
                io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
            })?);
        Ok(self)
    }

    /// Changes to `dir` last, once every mount is in place (so it may be inside a volume).
    pub fn working_dir(mut self, dir: &Path) -> io::Result<Self> {
        self.working_dir = Some(c_path(dir)?);
        Ok(self)
    }

    fn bind_resolv_conf_over(mut self, file: &Path, resolv_conf: &Path) -> io::Result<Self> {
        let source = regular_file(file, "the pod's resolv.conf")?;
        let target = regular_file(resolv_conf, "the file to bind the pod's resolv.conf over")?;
        self.resolv_conf = Some(FileBind { source: c_path(&source)?, target: c_path(&target)? });
        Ok(self)
    }

    /// Applies the setup to the calling process. Meant for the forked child: plain libc, no
    /// allocation, no locks.
    pub fn apply(&self) -> io::Result<()> {
        let check = |result: libc::c_int| {
            if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
        };
        // SAFETY: every pointer passed below points at a live NUL-terminated buffer or a local,
        // and every descriptor is owned by `self`.
        unsafe {
            if let Some(procs) = &self.cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                check(fd)?;
                // "0" moves the writing process itself (cgroup-v2.rst, "cgroup.procs").
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
            }
            if self.new_session {
                check(libc::setsid())?;
            }
            if self.controlling_terminal {
                // The standard streams are in place before the pre-exec steps run.
                check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            }
            if let Some(netns) = &self.netns {
                check(libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET))?;
            }
            if let Some(hostname) = &self.hostname {
                check(libc::unshare(libc::CLONE_NEWUTS))?;
                let name = hostname.as_bytes();
                check(libc::sethostname(name.as_ptr().cast(), name.len()))?;
            }
            if let Some(ns) = &self.join_mount_ns {
                check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS))?;
            }
            let none = std::ptr::null();
            if self.mounts.is_some() || self.resolv_conf.is_some() {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                // The copied mounts keep the propagation of the node's ("shared" under
                // systemd): make them private first, or the mounts below would appear on the
                // node too (sharedsubtree.rst in the kernel's documentation).
                check(libc::mount(
                    none,
                    c"/".as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
            }
            if let Some(mounts) = &self.mounts {
                apply_mounts(mounts)?;
            }
            if let Some(bind) = &self.resolv_conf {
                check(libc::mount(
                    bind.source.as_ptr(),
                    bind.target.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
                // A bind mount takes MS_RDONLY only on a remount (mount(2), "Creating a bind
                // mount"): the pod cannot write the agent's copy that the other containers
                // of the pod and `lab exec` read.
                check(libc::mount(
                    none,
                    bind.target.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                ))?;
            }
            if let Some(dir) = &self.working_dir {
                check(libc::chdir(dir.as_ptr()))?;
            }
        }
        Ok(())
    }

    /// Makes `command` apply this setup in its child before exec.
    pub fn install(self, command: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        // SAFETY: apply() only makes async-signal-safe calls on data prepared before the fork.
        unsafe {
            command.pre_exec(move || self.apply());
        }
    }
}

/// Carries out a mount plan in the calling process's own (private) mount namespace. Plain
/// system calls on prepared data only: this runs between fork and exec.
///
/// # Safety
/// Every pointer in `mounts` must point at a live NUL-terminated string.
unsafe fn apply_mounts(mounts: &PreparedMounts) -> io::Result<()> {
    let check = |result: libc::c_int| {
        if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    };
    let none = std::ptr::null();
    // SAFETY: the caller guarantees the strings; locals outlive the calls.
    unsafe {
        let make_dir = |path: &CString| {
            if libc::mkdir(path.as_ptr(), 0o755) < 0
                && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        let make_file = |path: &CString| {
            let fd =
                libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        };
        let bind = |from: &CString, at: &CString, recursive: bool| {
            let flags = libc::MS_BIND | if recursive { libc::MS_REC } else { 0 };
            check(libc::mount(from.as_ptr(), at.as_ptr(), none, flags, std::ptr::null()))
        };
        for scaffold in &mounts.scaffolds {
            check(libc::mount(
                c"scaffold".as_ptr(),
                mounts.staging.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                scaffold.options.as_ptr().cast(),
            ))?;
            for entry in &scaffold.entries {
                match entry {
                    PreparedEntry::Dir { at, from } => {
                        make_dir(at)?;
                        bind(from, at, true)?;
                    }
                    PreparedEntry::File { at, from } => {
                        make_file(at)?;
                        bind(from, at, false)?;
                    }
                    PreparedEntry::Symlink { at, to } => {
                        check(libc::symlink(to.as_ptr(), at.as_ptr()))?
                    }
                }
            }
            if scaffold.pivot {
                // The scaffold becomes the root of this namespace, so that a process joining
                // it later (an exec probe) finds the same tree (pivot_root(2), "pivot_root(".",
                // ".")"); the node's root, stacked under it, is detached.
                check(libc::chdir(mounts.staging.as_ptr()))?;
                check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr())
                    as libc::c_int)?;
                check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
                check(libc::chdir(c"/".as_ptr()))?;
            } else {
                check(libc::mount(
                    mounts.staging.as_ptr(),
                    scaffold.dir.as_ptr(),
                    none,
                    libc::MS_MOVE,
                    std::ptr::null(),
                ))?;
            }
        }
        for mount in &mounts.mounts {
            for dir in &mount.make_dirs {
                make_dir(dir)?;
            }
            match mount.make_target {
                Some(true) => make_dir(&mount.target)?,
                Some(false) => make_file(&mount.target)?,
                None => {}
            }
            bind(&mount.source, &mount.target, true)?;
            if mount.read_only {
                check(libc::mount(
                    none,
                    mount.target.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                ))?;
            }
        }
    }
    Ok(())
}

/// Starts the container. The child joins its cgroup, its own session, the pod's network
/// namespace, a UTS namespace carrying the pod's hostname and, if the pod has its own
/// resolv.conf, a mount namespace showing it, before `exec`, so no instruction of the workload
/// runs outside them. The child is not tied to the agent: it keeps running if the
/// agent exits, and a restarted agent adopts it.
///
/// Its stdout and stderr are pipes to a log shim (`strait log-shim`, see `logs.rs`) started
/// first in a session of its own, so that the log goes on being written across agent
/// restarts; the shim ends when the container and whatever it started have closed both.
pub fn spawn(launch: &Launch, strait_exe: &Path) -> io::Result<tokio::process::Child> {
    let (stdout_read, stdout_write) = io::pipe()?;
    let (stderr_read, stderr_write) = io::pipe()?;
    spawn_log_shim(launch, strait_exe, stdout_read.into(), stderr_read.into())?;
    let setup = ChildSetup::new()
        .join_cgroup(&launch.cgroup_procs)?
        .new_session()
        .enter_netns(&launch.netns_path)?
        .hostname(&launch.hostname)?;
    let setup = setup.mounts(&launch.mounts, &launch.scaffold_dir)?;
    let setup = match &launch.resolv_conf {
        Some(file) => setup.bind_resolv_conf(file)?,
        None => setup,
    };
    // After the mounts: the working directory may be a volume.
    let setup = match &launch.working_dir {
        Some(dir) => setup.working_dir(dir)?,
        None => setup,
    };

    let mut command = tokio::process::Command::new(&launch.program);
    command
        .args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout_write)
        .stderr(stderr_write);
    setup.install(command.as_std_mut());
    command.spawn().map_err(|e| {
        io::Error::new(e.kind(), format!("starting {}: {e}", launch.program.display()))
    })
}

/// The file descriptor on which the log shim reads the container's stderr (stdin is stdout).
pub const LOG_SHIM_STDERR_FD: i32 = 3;

/// Starts the shim that writes `launch`'s log from the two pipes' read ends, and reaps it
/// when it ends (after the container and whatever it started closed both pipes).
fn spawn_log_shim(
    launch: &Launch,
    strait_exe: &Path,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    let setup = ChildSetup::new().join_cgroup(&launch.log_shim_cgroup_procs)?.new_session();
    let mut command = std::process::Command::new(strait_exe);
    command
        .arg("log-shim")
        .arg("--path")
        .arg(&launch.log_path)
        .arg("--max-size")
        .arg(launch.log_rotation.max_size.to_string())
        .arg("--max-files")
        .arg(launch.log_rotation.max_files.to_string())
        .env_clear()
        .stdin(Stdio::from(stdout))
        .stdout(Stdio::null());
    let stderr_fd = stderr.as_raw_fd();
    // SAFETY: between fork and exec, only async-signal-safe calls: the setup's, then dup2 of
    // a descriptor that stays open until spawn returns (dup2 clears CLOEXEC on the copy).
    unsafe {
        command.pre_exec(move || {
            setup.apply()?;
            if libc::dup2(stderr_fd, LOG_SHIM_STDERR_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut shim = tokio::process::Command::from(command).spawn().map_err(|e| {
        io::Error::new(e.kind(), format!("starting the log shim {}: {e}", strait_exe.display()))
    })?;
    drop(stderr);
    tokio::spawn(async move {
        if let Ok(status) = shim.wait().await
            && !status.success()
        {
            tracing::warn!(%status, "a log shim ended with an error");
        }
    });
    Ok(())
}

/// `path` with every symlink resolved, if it is a regular file.
fn regular_file(path: &Path, what: &str) -> io::Result<PathBuf> {
    let resolved = std::fs::canonicalize(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{what}: {} (or the file its symlink points to): {e}", path.display()),
        )
    })?;
    if !resolved.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}: {} is not a regular file", resolved.display()),
        ));
    }
    Ok(resolved)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// The start time of a process in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
/// With the pid it identifies a process across pid reuse.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: skip past its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `start_ticks` (and not a zombie).
pub fn is_same_process_alive(pid: u32, start_ticks: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(end) = stat.rfind(')') else { return false };
    let mut fields = stat[end + 1..].split_whitespace();
    let state = fields.next();
    let ticks = fields.nth(18).and_then(|t| t.parse::<u64>().ok());
    state != Some("Z") && ticks == Some(start_ticks)
}

/// Waits until a process that is not our child exits, with a pidfd (Linux 5.3+): the fd turns
/// readable when the process terminates.
pub async fn wait_for_exit_of(pid: u32) -> io::Result<()> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        let error = io::Error::last_os_error();
        // ESRCH: already gone.
        return if error.raw_os_error() == Some(libc::ESRCH) { Ok(()) } else { Err(error) };
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // SAFETY: `pidfd` owns its descriptor and nothing replaces or closes it while registered.
    let pidfd = unsafe { AsyncFd::register(pidfd)? };
    let _ready = pidfd.readable().await?;
    Ok(())
}

/// Resolves `program` like a shell would: a path with a slash is used as is, a bare name is
/// searched in `PATH` (the container's, else the agent's).
pub fn resolve_program(program: &str, path_var: Option<&str>) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let default_path =
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let search = path_var.map(str::to_owned).unwrap_or(default_path);
    search
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{ChildSetup, is_same_process_alive, process_start_ticks, resolve_program};

    #[test]
    fn resolv_conf_binds_onto_what_a_symlink_points_to_and_refuses_dangling_ones() {
        let dir = std::env::temp_dir().join(format!("strait-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let pod_file = dir.join("pod-resolv.conf");
        let real = dir.join("stub-resolv.conf");
        std::fs::write(&pod_file, "nameserver 10.96.0.10\n").unwrap();
        std::fs::write(&real, "nameserver 127.0.0.53\n").unwrap();
        let link = dir.join("resolv.conf");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let dangling = dir.join("dangling.conf");
        std::os::unix::fs::symlink(dir.join("missing"), &dangling).unwrap();

        let setup = ChildSetup::new().bind_resolv_conf_over(&pod_file, &link).expect("a symlink");
        let bind = setup.resolv_conf.expect("a bind is prepared");
        assert_eq!(
            bind.target.to_bytes(),
            real.canonicalize().unwrap().as_os_str().as_encoded_bytes()
        );

        let error = ChildSetup::new().bind_resolv_conf_over(&pod_file, &dangling).unwrap_err();
        assert!(error.to_string().contains("dangling.conf"), "names the file: {error}");
        let error = ChildSetup::new()
            .bind_resolv_conf_over(&dir.join("no-such-pod-file"), &link)
            .unwrap_err();
        assert!(error.to_string().contains("the pod's resolv.conf"), "{error}");
        assert!(ChildSetup::new().bind_resolv_conf_over(&pod_file, Path::new("/")).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn own_process_is_identified_by_pid_and_start_time() {
        let pid = std::process::id();
        let ticks = process_start_ticks(pid).expect("own stat is readable");
        assert!(is_same_process_alive(pid, ticks));
        assert!(
            !is_same_process_alive(pid, ticks + 1),
            "a different start time is another process"
        );
    }

    #[test]
    fn bare_program_names_are_searched_in_path() {
        let sh = resolve_program("sh", Some("/nonexistent:/bin:/usr/bin")).expect("sh exists");
        assert!(sh.ends_with("sh"));
        assert_eq!(resolve_program("/x/y", None).as_deref(), Some(std::path::Path::new("/x/y")));
        assert!(resolve_program("no-such-program-strait", Some("/bin")).is_none());
    }
}
