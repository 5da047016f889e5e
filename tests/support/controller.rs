//! `strait controller` as a process of its own, so a test can kill it with SIGKILL: the
//! guard kills it (if still running) and waits for it when dropped, also on panic.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use strait_controlplane::{
    auth::{ClientCredentials, ClusterPki, pki::read_admin_credentials},
    client::ApiClient,
};

pub struct ControllerProcess {
    child: Option<Child>,
    url: String,
    log: PathBuf,
    /// The cluster PKI it serves with: `--pki-dir` if `extra` gave one, else its default.
    pki_dir: PathBuf,
}

impl ControllerProcess {
    /// Starts `strait controller` on a free loopback port with `--store store` (`embedded`
    /// keeps the file in `data_dir`) and waits until its API answers. Replicas of one cluster
    /// are given one `--pki-dir` in `extra`.
    pub async fn start(data_dir: &Path, store: &str, extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("finding a free port")
            .port();
        std::fs::create_dir_all(data_dir).expect("creating the data directory");
        let log = data_dir.join(format!("controller-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("creating the controller log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_strait"));
        command
            .arg("controller")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--store", store])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("the log"))
            .stderr(log_file);
        {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: prctl is async-signal-safe; a controller never outlives the test.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("starting strait controller");
        let pki_dir = extra
            .iter()
            .position(|arg| *arg == "--pki-dir")
            .and_then(|at| extra.get(at + 1))
            .map_or_else(|| data_dir.join("pki"), PathBuf::from);
        let url = format!("https://127.0.0.1:{port}");
        let controller = Self { child: Some(child), url, log, pki_dir };
        controller.wait_ready().await;
        controller
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            // The controller creates the PKI when it starts: the credential comes first.
            if let Ok(admin) = read_admin_credentials(&self.pki_dir)
                && client_of(&self.url, &admin)
                    .list::<k8s_openapi::api::core::v1::Namespace>(None, "")
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the controller did not serve within 30s:\n{}",
                self.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The API client of this controller with the admin credential (every test builds its
    /// clients here or with [`client_of`]).
    pub fn client(&self) -> ApiClient {
        client_of(&self.url, &self.admin_credentials())
    }

    /// The cluster's admin credential.
    pub fn admin_credentials(&self) -> ClientCredentials {
        read_admin_credentials(&self.pki_dir).expect("reading the admin credential")
    }

    /// The identity of the agent of `node`, issued by the cluster CA.
    pub fn node_credentials(&self, node: &str) -> ClientCredentials {
        ClusterPki::open(&self.pki_dir)
            .and_then(|pki| pki.issue_node(node))
            .expect("issuing a node's credentials")
    }

    /// SIGKILL, then wait until the process is gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

/// An API client of one controller URL, or of several replicas separated by commas.
pub fn client_of(urls: &str, credentials: &ClientCredentials) -> ApiClient {
    ApiClient::new(urls, credentials).expect("an API client")
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
