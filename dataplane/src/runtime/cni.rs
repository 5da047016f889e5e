//! Running the CNI plugin exactly as a container runtime does: the verb and the attachment in
//! `CNI_*` environment variables, the network configuration on stdin, the result or the error
//! as JSON on stdout (CNI spec 1.1, "Execution Protocol").

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
};

use ipnet::Ipv4Net;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

/// The interface name every pod gets.
pub const POD_IFNAME: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("running CNI {verb} with {plugin}")]
    Exec {
        verb: &'static str,
        plugin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI {verb} failed with code {code}: {message}{details}")]
    Plugin { verb: &'static str, code: u32, message: String, details: String },
    #[error("CNI {verb} answered something that is not a CNI result: {output}")]
    Malformed { verb: &'static str, output: String },
}

/// One attachment of a pod to the network: which container, which namespace, which interface.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    pub netns_path: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS` pairs, e.g. `K8S_POD_NAMESPACE`, `K8S_POD_NAME`.
    pub args: Vec<(String, String)>,
}

/// What an ADD returned that the agent needs, with the whole result kept for CHECK.
#[derive(Clone, Debug)]
pub struct AddResult {
    pub pod_ip: Ipv4Addr,
    pub raw: serde_json::Value,
}

#[derive(Deserialize)]
struct ErrorJson {
    code: u32,
    msg: String,
    #[serde(default)]
    details: String,
}

/// Executes one CNI plugin binary with one network configuration.
#[derive(Clone, Debug)]
pub struct CniInvoker {
    plugin: PathBuf,
    config: serde_json::Value,
}

impl CniInvoker {
    pub fn new(plugin: PathBuf, config: serde_json::Value) -> Self {
        Self { plugin, config }
    }

    /// The network configuration strait's agent gives its plugin for a node.
    pub fn strait_config(
        pod_cidr: Ipv4Net,
        data_dir: &Path,
        pin_dir: Option<&Path>,
    ) -> serde_json::Value {
        let mut config = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "strait",
            "type": "strait-cni",
            "ipam": { "type": "strait", "subnet": pod_cidr.to_string(), "dataDir": data_dir },
        });
        if let Some(pin_dir) = pin_dir {
            config["antiSpoof"] = serde_json::json!({ "pinDir": pin_dir });
        }
        config
    }

    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    pub async fn add(&self, attachment: &Attachment) -> Result<AddResult, CniError> {
        let output = self.exec("ADD", attachment, &self.config).await?;
        let raw: serde_json::Value = serde_json::from_slice(&output)
            .map_err(|_| CniError::Malformed { verb: "ADD", output: lossy(&output) })?;
        let pod_ip = raw["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str()?.parse::<Ipv4Net>().ok())
            .map(|net| net.addr())
            .next()
            .ok_or_else(|| CniError::Malformed { verb: "ADD", output: lossy(&output) })?;
        Ok(AddResult { pod_ip, raw })
    }

    /// DEL is idempotent on the plugin's side: calling it for something already gone succeeds.
    pub async fn del(
        &self,
        attachment: &Attachment,
        prev_result: Option<&serde_json::Value>,
    ) -> Result<(), CniError> {
        let mut config = self.config.clone();
        if let Some(prev) = prev_result {
            config["prevResult"] = prev.clone();
        }
        self.exec("DEL", attachment, &config).await.map(drop)
    }

    pub async fn check(
        &self,
        attachment: &Attachment,
        prev_result: &serde_json::Value,
    ) -> Result<(), CniError> {
        let mut config = self.config.clone();
        config["prevResult"] = prev_result.clone();
        self.exec("CHECK", attachment, &config).await.map(drop)
    }

    async fn exec(
        &self,
        verb: &'static str,
        attachment: &Attachment,
        config: &serde_json::Value,
    ) -> Result<Vec<u8>, CniError> {
        let exec_error = |source| CniError::Exec { verb, plugin: self.plugin.clone(), source };
        let cni_path = self.plugin.parent().map(Path::to_path_buf).unwrap_or_default();
        let args =
            attachment.args.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";");
        let mut child = tokio::process::Command::new(&self.plugin)
            .env_clear()
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", &attachment.container_id)
            .env("CNI_NETNS", &attachment.netns_path)
            .env("CNI_IFNAME", &attachment.ifname)
            .env("CNI_ARGS", args)
            .env("CNI_PATH", cni_path)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(exec_error)?;
        let body = serde_json::to_vec(config).map_err(|e| exec_error(e.into()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&body).await.map_err(exec_error)?;
        }
        let output = child.wait_with_output().await.map_err(exec_error)?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        match serde_json::from_slice::<ErrorJson>(&output.stdout) {
            Ok(error) => Err(CniError::Plugin {
                verb,
                code: error.code,
                message: error.msg,
                details: if error.details.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", error.details)
                },
            }),
            Err(_) => Err(CniError::Malformed { verb, output: lossy(&output.stdout) }),
        }
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
