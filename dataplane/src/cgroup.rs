//! strait's own cgroup v2 subtree: `<cgroup2 mount>/strait/…`. Pods, agents and lab processes
//! live here, never in the root cgroup, so socket hooks attached here touch only strait's
//! processes and `cgroup.kill` can stop a whole lab or pod at once.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Every cgroup strait makes is under this directory of the cgroup v2 hierarchy.
pub const STRAIT_CGROUP: &str = "strait";

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on most hosts, `/sys/fs/cgroup/unified` on hybrid
/// layouts. Read from `/proc/self/mountinfo`, never assumed.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    for line in mountinfo.lines() {
        // Fields: id parent major:minor root mount-point options... - fstype source super-options
        let Some((before, after)) = line.split_once(" - ") else { continue };
        if after.split_whitespace().next() == Some("cgroup2")
            && let Some(mount_point) = before.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mount_point));
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, "no cgroup2 hierarchy in /proc/self/mountinfo"))
}

/// One cgroup inside strait's subtree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// The cgroup at `relative` below the cgroup2 mount, which must be inside `strait/`.
    pub fn new(relative: &Path) -> io::Result<Self> {
        if relative.components().next().map(|c| c.as_os_str()) != Some(STRAIT_CGROUP.as_ref())
            || relative.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cgroup {} is outside strait's subtree", relative.display()),
            ));
        }
        Ok(Self { path: cgroup2_mount()?.join(relative) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A child of this cgroup.
    pub fn child(&self, name: &str) -> Self {
        Self { path: self.path.join(name) }
    }

    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    pub fn create(&self) -> io::Result<()> {
        crate::dirs::create_dir_all_shared(&self.path)
    }

    /// `cgroup.procs`, the file a process writes to in order to join.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Moves a process into this cgroup.
    pub fn add_process(&self, pid: u32) -> io::Result<()> {
        fs::write(self.procs_file(), pid.to_string())
    }

    /// Processes of this cgroup and every descendant.
    pub fn processes(&self) -> io::Result<Vec<u32>> {
        let mut pids = Vec::new();
        self.walk(&mut |cgroup| {
            match fs::read_to_string(cgroup.join("cgroup.procs")) {
                Ok(procs) => {
                    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            Ok(())
        })?;
        Ok(pids)
    }

    /// Whether any process is left in this cgroup or below (`cgroup.events`).
    pub fn is_populated(&self) -> io::Result<bool> {
        match fs::read_to_string(self.path.join("cgroup.events")) {
            Ok(events) => Ok(events.lines().any(|line| line.trim() == "populated 1")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// CPU time used by the subtree so far, in microseconds (`cpu.stat` `usage_usec`, which
    /// cgroup v2 keeps whether or not the cpu controller is enabled).
    pub fn cpu_usage_usec(&self) -> io::Result<u64> {
        let stat = fs::read_to_string(self.path.join("cpu.stat"))?;
        stat.lines()
            .find_map(|line| line.strip_prefix("usage_usec "))
            .and_then(|value| value.trim().parse().ok())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "cpu.stat without usage_usec")
            })
    }

    /// Memory used by the subtree, in bytes (`memory.current`); `None` where the memory
    /// controller is not enabled for this cgroup.
    pub fn memory_current(&self) -> io::Result<Option<u64>> {
        match fs::read_to_string(self.path.join("memory.current")) {
            Ok(text) => Ok(text.trim().parse().ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Memory resident for the subtree's processes, in bytes: the sum of their `VmRSS`, what
    /// can be told where the memory controller is not enabled (no `memory.current`). Memory
    /// that processes share counts once per process; processes that exit meanwhile are left
    /// out.
    pub fn resident_memory(&self) -> io::Result<u64> {
        let mut total = 0;
        for pid in self.processes()? {
            if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
                total += vm_rss_bytes(&status).unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// Sends `signal` to every process in the subtree.
    pub fn signal_all(&self, signal: nix::sys::signal::Signal) -> io::Result<()> {
        for pid in self.processes()? {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            match nix::sys::signal::kill(pid, signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Kills every process in the subtree (`cgroup.kill`, Linux 5.14+; SIGKILL to each process
    /// where that file is missing) and waits up to `timeout` for the subtree to empty.
    pub fn kill_all(&self, timeout: Duration) -> io::Result<()> {
        if !self.exists() {
            return Ok(());
        }
        match fs::write(self.path.join("cgroup.kill"), "1") {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.signal_all(nix::sys::signal::Signal::SIGKILL)?
            }
            Err(e) => return Err(e),
        }
        let deadline = Instant::now() + timeout;
        while self.is_populated()? {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("processes still in {} after kill", self.path.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Removes this cgroup and its descendants, deepest first. They must hold no process.
    /// Succeeds when the cgroup is already gone.
    pub fn remove(&self) -> io::Result<()> {
        let mut dirs = Vec::new();
        self.walk(&mut |cgroup| {
            dirs.push(cgroup.to_owned());
            Ok(())
        })?;
        for dir in dirs.iter().rev() {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("removing cgroup {}: {e}", dir.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Visits this cgroup and then its descendants, parents before children.
    fn walk(&self, visit: &mut dyn FnMut(&Path) -> io::Result<()>) -> io::Result<()> {
        fn walk_dir(dir: &Path, visit: &mut dyn FnMut(&Path) -> io::Result<()>) -> io::Result<()> {
            visit(dir)?;
            let entries = match fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    walk_dir(&entry.path(), visit)?;
                }
            }
            Ok(())
        }
        if !self.exists() {
            return Ok(());
        }
        walk_dir(&self.path, visit)
    }
}

/// The `VmRSS` of a `/proc/<pid>/status`, in bytes (`None` for a kernel thread or a zombie,
/// which have none).
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let value = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?;
    let kib: u64 = value.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{Cgroup, vm_rss_bytes};

    #[test]
    fn resident_memory_is_read_from_vm_rss_in_kibibytes() {
        let status = "Name:\tnetexec\nVmPeak:\t  20000 kB\nVmRSS:\t    5120 kB\nThreads:\t3\n";
        assert_eq!(vm_rss_bytes(status), Some(5120 * 1024));
        assert_eq!(vm_rss_bytes("Name:\tkthreadd\nThreads:\t1\n"), None);
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(vm_rss_bytes(&own).is_some_and(|b| b > 0), "this process has resident memory");
    }

    #[test]
    fn cgroups_outside_straits_subtree_are_refused() {
        for outside in ["", "system.slice", "../strait", "strait/../etc", "/strait"] {
            assert!(Cgroup::new(Path::new(outside)).is_err(), "{outside:?} must be refused");
        }
    }
}
