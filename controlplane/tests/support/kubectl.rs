//! Running the real kubectl binaries against a `TestController`, shared by the kubectl tests.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use strait_controlplane::{auth::ClientCredentials, testing::TestController};
use tokio::process::Command;

pub const KUBECTL_DIR: &str = "/usr/lib/google-cloud-sdk/bin";

/// One kubectl version with its own kubeconfig and discovery cache.
pub struct Kubectl {
    binary: PathBuf,
    kubeconfig: PathBuf,
}

pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Kubectl {
    /// kubectl `version` (`1.27`…`1.33`) against `server` as its admin, its files under the
    /// controller's data directory.
    pub fn new(version: &str, server: &TestController) -> Self {
        Self::as_user(version, server, "admin", &server.admin_credentials())
    }

    /// kubectl `version` against `server` with `credentials`; `user` names its files (each
    /// user has its own kubeconfig and discovery cache).
    pub fn as_user(
        version: &str,
        server: &TestController,
        user: &str,
        credentials: &ClientCredentials,
    ) -> Self {
        let binary = Path::new(KUBECTL_DIR).join(format!("kubectl.{version}"));
        assert!(
            binary.exists(),
            "{} is missing: this test needs the real kubectl",
            binary.display()
        );
        let kubeconfig = server.data_dir().join(format!("kubeconfig-{version}-{user}"));
        server.write_kubeconfig_with(&kubeconfig, credentials);
        Self { binary, kubeconfig }
    }

    /// kubectl `version` against the API at `url` (a relay in front of `server`).
    pub fn through(version: &str, server: &TestController, url: &str) -> Self {
        let kubectl = Self::new(version, server);
        let config = strait_controlplane::testing::kubeconfig(url, "default");
        std::fs::write(&kubectl.kubeconfig, config).expect("writing the kubeconfig");
        kubectl
    }

    /// The directory for files a test hands to kubectl (manifests, editor scripts).
    pub fn dir(&self) -> &Path {
        self.kubeconfig.parent().unwrap_or(Path::new("/tmp"))
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            // No discovery cache shared between tests or with the user's.
            .env("KUBECACHEDIR", self.kubeconfig.with_extension("cache"))
            .env("HOME", self.dir())
            .env_remove("KUBE_EDITOR")
            .env_remove("EDITOR")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    pub async fn output(&self, mut command: Command, what: &str) -> Output {
        let output = tokio::time::timeout(Duration::from_secs(30), command.output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {what} did not finish within 30s"))
            .expect("kubectl runs");
        Output {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    pub async fn run(&self, args: &[&str]) -> Output {
        self.output(self.command(args), &format!("{args:?}")).await
    }

    /// Runs kubectl and expects it to succeed.
    pub async fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert!(output.ok, "kubectl {args:?} failed:\n{}\n{}", output.stdout, output.stderr);
        output.stdout
    }

    /// Runs kubectl and expects it to fail; returns what it printed on stderr.
    pub async fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert!(!output.ok, "kubectl {args:?} succeeded:\n{}", output.stdout);
        output.stderr
    }
}
