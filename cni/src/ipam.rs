//! strait's built-in IPAM: hands out the node's pod subnet one address at a time, and never the
//! same address twice while it is held.
//!
//! State is a directory per network, `<dataDir>/<network name>/`:
//! - one file per allocated address, named after it (`10.244.1.7`), holding the owner's
//!   container ID and interface name on two lines;
//! - `last_reserved_ip`, where the round-robin search resumes, so a just-released address is
//!   not handed straight to the next pod (whose peers may still have the old pod cached);
//! - `lock`, held with `flock(2)` around every read-modify-write, so concurrent plugin
//!   processes (and threads: each opens its own file description) never race.

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;

use crate::{error::exhausted_hint, invocation::Attachment};

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_FILE: &str = "last_reserved_ip";
/// How long a plugin waits for the lock before answering "try again later" (CNI code 11).
const LOCK_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}", exhausted_hint(*subnet, *in_use, *capacity))]
    Exhausted { subnet: Ipv4Net, in_use: usize, capacity: usize },
    #[error(
        "the address store {} stayed locked for {waited:?}: another strait-cni is still \
         working on it; try again later",
        path.display()
    )]
    LockTimeout { path: PathBuf, waited: Duration },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IpamError {
    let path = path.to_owned();
    move |source| IpamError::Io { action, path, source }
}

/// One held address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub owner: Attachment,
}

/// How full the subnet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub in_use: usize,
    pub capacity: usize,
}

/// The address store of one network on one node.
#[derive(Clone, Debug)]
pub struct PodIpAllocator {
    dir: PathBuf,
    subnet: Ipv4Net,
    lock_wait: Duration,
}

impl PodIpAllocator {
    pub fn new(data_dir: &Path, network: &str, subnet: Ipv4Net) -> Self {
        Self { dir: data_dir.join(network), subnet, lock_wait: LOCK_WAIT }
    }

    /// How long to wait for the store's lock before giving up with "try again later".
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first and last address a pod may get: the network address, the first host address
    /// (kept for the node) and the broadcast address are never handed out.
    fn assignable(&self) -> (u32, u32) {
        (u32::from(self.subnet.network()) + 2, u32::from(self.subnet.broadcast()) - 1)
    }

    pub fn capacity(&self) -> usize {
        let (first, last) = self.assignable();
        (last - first + 1) as usize
    }

    /// Gives `owner` an address: the one it already holds (a repeated ADD), or the next free
    /// one after the last handed out, wrapping around the subnet.
    pub fn allocate(&self, owner: &Attachment) -> Result<Ipv4Addr, IpamError> {
        let _lock = self.lock()?;
        let held = self.read_allocations()?;
        if let Some(existing) = held.iter().find(|allocation| &allocation.owner == owner) {
            return Ok(existing.ip);
        }
        let (first, last) = self.assignable();
        let taken: HashSet<Ipv4Addr> = held.iter().map(|allocation| allocation.ip).collect();
        let resume_after = self.last_reserved().filter(|ip| (first..=last).contains(ip));
        let start = match resume_after {
            Some(ip) if ip < last => ip + 1,
            _ => first,
        };
        let span = last - first + 1;
        for step in 0..span {
            let candidate = Ipv4Addr::from(first + (start - first + step) % span);
            if taken.contains(&candidate) {
                continue;
            }
            if self.write_allocation(candidate, owner)? {
                self.write_last_reserved(candidate)?;
                return Ok(candidate);
            }
        }
        let in_use = held.iter().filter(|allocation| self.subnet.contains(&allocation.ip)).count();
        Err(IpamError::Exhausted { subnet: self.subnet, in_use, capacity: self.capacity() })
    }

    /// Releases whatever `owner` holds. Returns the address, or `None` when it held nothing
    /// (a repeated DEL).
    pub fn release(&self, owner: &Attachment) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        let mut released = None;
        for allocation in self.read_allocations()? {
            if &allocation.owner == owner {
                self.remove_allocation(allocation.ip)?;
                released = Some(allocation.ip);
            }
        }
        Ok(released)
    }

    /// The address `owner` holds, if any.
    pub fn allocation_of(&self, owner: &Attachment) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        Ok(self
            .read_allocations()?
            .into_iter()
            .find(|allocation| &allocation.owner == owner)
            .map(|allocation| allocation.ip))
    }

    /// Every held address, in address order.
    pub fn allocations(&self) -> Result<Vec<Allocation>, IpamError> {
        let _lock = self.lock()?;
        self.read_allocations()
    }

    /// Releases every allocation whose owner is not in `keep` and returns what it released,
    /// so the caller can remove what else those attachments left behind.
    pub fn release_all_except(
        &self,
        keep: &HashSet<Attachment>,
    ) -> Result<Vec<Allocation>, IpamError> {
        let _lock = self.lock()?;
        let mut released = Vec::new();
        for allocation in self.read_allocations()? {
            if !keep.contains(&allocation.owner) {
                self.remove_allocation(allocation.ip)?;
                released.push(allocation);
            }
        }
        Ok(released)
    }

    pub fn usage(&self) -> Result<Usage, IpamError> {
        let _lock = self.lock()?;
        let in_use = self
            .read_allocations()?
            .iter()
            .filter(|allocation| self.subnet.contains(&allocation.ip))
            .count();
        Ok(Usage { in_use, capacity: self.capacity() })
    }

    fn lock(&self) -> Result<StoreLock, IpamError> {
        fs::create_dir_all(&self.dir).map_err(io_error("creating the address store", &self.dir))?;
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error("opening the lock file", &path))?;
        let started = Instant::now();
        let mut pause = Duration::from_micros(100);
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if locked == 0 {
                return Ok(StoreLock { _file: file });
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => {}
                _ => return Err(io_error("locking", &path)(error)),
            }
            if started.elapsed() >= self.lock_wait {
                return Err(IpamError::LockTimeout { path, waited: started.elapsed() });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    fn read_allocations(&self) -> Result<Vec<Allocation>, IpamError> {
        let entries =
            fs::read_dir(&self.dir).map_err(io_error("listing the address store", &self.dir))?;
        let mut allocations = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("listing the address store", &self.dir))?;
            let Some(ip) = entry.file_name().to_str().and_then(|name| name.parse().ok()) else {
                continue;
            };
            let path = entry.path();
            let content =
                fs::read_to_string(&path).map_err(io_error("reading allocation", &path))?;
            let mut lines = content.lines();
            let owner = Attachment {
                container_id: lines.next().unwrap_or_default().to_owned(),
                ifname: lines.next().unwrap_or_default().to_owned(),
            };
            allocations.push(Allocation { ip, owner });
        }
        allocations.sort_by_key(|allocation| allocation.ip);
        Ok(allocations)
    }

    /// Creates the allocation file; `false` when the address turned out to be taken.
    fn write_allocation(&self, ip: Ipv4Addr, owner: &Attachment) -> Result<bool, IpamError> {
        let path = self.dir.join(ip.to_string());
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_error("creating allocation", &path)(e)),
        };
        let written = writeln!(file, "{}\n{}", owner.container_id, owner.ifname);
        if let Err(e) = written {
            // A file without its owner would hold the address for nobody.
            let _ = fs::remove_file(&path);
            return Err(io_error("writing allocation", &path)(e));
        }
        Ok(true)
    }

    fn remove_allocation(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("removing allocation", &path)(e)),
        }
    }

    fn last_reserved(&self) -> Option<u32> {
        fs::read_to_string(self.dir.join(LAST_RESERVED_FILE))
            .ok()
            .and_then(|text| text.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
    }

    fn write_last_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let path = self.dir.join(LAST_RESERVED_FILE);
        fs::write(&path, ip.to_string()).map_err(io_error("recording the last allocation", &path))
    }
}

/// Holds the store's `flock` until dropped (closing the descriptor releases it).
struct StoreLock {
    _file: File,
}
