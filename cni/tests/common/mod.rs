//! Helpers shared by strait-cni's unprivileged tests.
#![allow(dead_code, reason = "each test binary uses a different part of this module")]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::Value;
use strait_cni::Response;

/// A directory under the system temp dir, removed with everything in it when dropped (also
/// when the test panics).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "strait-t-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the plugin in-process as a runtime would call it: these variables, this stdin.
pub fn invoke(env: &[(&str, &str)], stdin: &str) -> Response {
    let env: HashMap<String, String> =
        env.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect();
    strait_cni::handle(|name| env.get(name).cloned(), Ok(stdin.as_bytes().to_vec()))
}

/// The error code of a failed response; panics (failing the test) on success.
pub fn error_code(response: &Response) -> u64 {
    assert!(!response.success, "expected a failure, got {:?}", response.stdout);
    let stdout = response.stdout.as_ref().expect("a failure prints an error object");
    stdout["code"].as_u64().unwrap_or_else(|| panic!("error object without a code: {stdout}"))
}

pub fn error_message(response: &Response) -> String {
    response.stdout.as_ref().and_then(|stdout| stdout["msg"].as_str()).unwrap_or("").to_owned()
}

/// A valid single-plugin configuration for `version`, storing allocations in `data_dir`.
pub fn config(version: &str, subnet: &str, data_dir: &Path) -> Value {
    serde_json::json!({
        "cniVersion": version,
        "name": "strait-test",
        "type": "strait-cni",
        "ipam": { "subnet": subnet, "dataDir": data_dir },
    })
}
