//! What the agent knows about a pod it runs, kept on disk so that a restarted agent rebuilds its
//! view from the files and the kernel instead of from memory (DESIGN.md, "State outlives
//! processes"). One JSON file per pod, replaced atomically.
//!
//! Layout under the agent's state directory (`--state-dir`):
//!
//! ```text
//! <state dir>/pods/<uid>.json         the pod's record
//! <state dir>/pods/<uid>/resolv.conf  the pod's /etc/resolv.conf, if it has its own
//! ```
//!
//! Anything that knows the state directory and a pod's uid finds its files from
//! [`pod_resolv_conf_path`] (`strait lab exec` does).

use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Name of the pod's network namespace under `/run/netns`.
    pub netns: String,
    /// The address CNI ADD gave the pod; `None` until ADD succeeded.
    pub pod_ip: Option<Ipv4Addr>,
    /// The ADD result, passed back to the plugin as `prevResult` on CHECK and DEL.
    pub cni_result: Option<serde_json::Value>,
    /// When the sandbox was made (RFC 3339).
    pub started_at: String,
    pub containers: BTreeMap<String, ContainerRecord>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRecord {
    /// The running process, if one was started and has not been seen to exit.
    pub pid: Option<u32>,
    /// Start time of `pid` in clock ticks since boot: tells a reused pid from ours.
    pub start_ticks: u64,
    pub started_at: String,
    pub restart_count: i32,
    pub last_exit: Option<ExitRecord>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitRecord {
    /// `None` when the exit was not observed by the agent that started the process (the agent
    /// restarted in between) and the code is therefore unknown.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: String,
    pub finished_at: String,
    /// Why the agent ended the process, when it did (a failed liveness or startup probe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The termination reason when the exit code does not tell it (`OOMKilled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The directory of pod records inside the agent's state directory.
pub const PODS_DIR: &str = "pods";

/// Name of a pod's resolver configuration inside its directory.
const RESOLV_CONF_FILE: &str = "resolv.conf";

/// The resolv.conf of pod `uid` for an agent whose state directory is `state_dir`.
pub fn pod_resolv_conf_path(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join(PODS_DIR).join(uid).join(RESOLV_CONF_FILE)
}

/// The directory of pod records: `<state dir>/pods` ([`PODS_DIR`]).
#[derive(Clone, Debug)]
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_owned() })
    }

    fn path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}.json"))
    }

    /// The directory of files the agent keeps for pod `uid` besides its record.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.dir.join(uid)
    }

    /// Where pod `uid`'s own resolv.conf lives (see [`pod_resolv_conf_path`]).
    pub fn resolv_conf_path(&self, uid: &str) -> PathBuf {
        self.pod_dir(uid).join(RESOLV_CONF_FILE)
    }

    /// Writes `text` as pod `uid`'s resolv.conf unless it already says exactly that. A new
    /// text replaces the file through rename(2): containers already running keep the file
    /// they mounted, new ones get the new text.
    pub fn write_resolv_conf(&self, uid: &str, text: &str) -> io::Result<PathBuf> {
        let path = self.resolv_conf_path(uid);
        if fs::read(&path).is_ok_and(|current| current == text.as_bytes()) {
            return Ok(path);
        }
        fs::create_dir_all(self.pod_dir(uid))?;
        let staged = path.with_extension("conf.new");
        fs::write(&staged, text)?;
        fs::rename(&staged, &path)?;
        Ok(path)
    }

    /// Removes the files of pod `uid` besides its record (see [`RecordStore::remove`]).
    pub fn remove_pod_dir(&self, uid: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.pod_dir(uid)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Writes the record through a temporary file and rename(2), so a crash leaves the old or
    /// the new record, never half of one.
    pub fn save(&self, record: &PodRecord) -> io::Result<()> {
        let path = self.path(&record.uid);
        let staged = path.with_extension("json.new");
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        fs::write(&staged, bytes)?;
        fs::File::open(&staged)?.sync_all()?;
        fs::rename(&staged, &path)
    }

    pub fn remove(&self, uid: &str) -> io::Result<()> {
        match fs::remove_file(self.path(uid)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every record on disk. A record that cannot be parsed is an error, not skipped: it stands
    /// for a pod whose namespace and processes would otherwise leak.
    pub fn load_all(&self) -> io::Result<Vec<PodRecord>> {
        let mut records = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = fs::read(&path)?;
            let record = serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
            })?;
            records.push(record);
        }
        records.sort_by(|a: &PodRecord, b| a.uid.cmp(&b.uid));
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::{ContainerRecord, PodRecord, RecordStore};

    #[test]
    fn records_survive_a_reload_and_removal_is_idempotent() {
        let dir = std::env::temp_dir().join(format!("strait-records-{}", std::process::id()));
        let store = RecordStore::open(&dir).expect("open");
        let mut record = PodRecord { uid: "u1".into(), name: "web".into(), ..Default::default() };
        record
            .containers
            .insert("c".into(), ContainerRecord { pid: Some(42), ..Default::default() });
        store.save(&record).expect("save");
        assert_eq!(store.load_all().expect("load"), vec![record]);
        store.remove("u1").expect("remove");
        store.remove("u1").expect("second remove");
        assert!(store.load_all().expect("load").is_empty());
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn a_pods_resolv_conf_lives_beside_its_record_and_does_not_disturb_loading() {
        let state = std::env::temp_dir().join(format!("strait-state-{}", std::process::id()));
        let store = RecordStore::open(&state.join(super::PODS_DIR)).expect("open");
        let record = PodRecord { uid: "u2".into(), ..Default::default() };
        store.save(&record).expect("save");
        let path = store.write_resolv_conf("u2", "nameserver 10.96.0.10\n").expect("write");
        assert_eq!(path, super::pod_resolv_conf_path(&state, "u2"), "found from the uid alone");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "nameserver 10.96.0.10\n");
        store.write_resolv_conf("u2", "nameserver 10.96.0.11\n").expect("rewrite");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "nameserver 10.96.0.11\n");
        assert_eq!(store.load_all().expect("the pod directory is not a record"), vec![record]);
        store.remove_pod_dir("u2").expect("remove");
        store.remove_pod_dir("u2").expect("second remove");
        assert!(!path.exists());
        std::fs::remove_dir_all(state).expect("cleanup");
    }
}
