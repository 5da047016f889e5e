//! strait's CNI plugin, `strait-cni`: a veth per pod, routed (not bridged) on the node, with
//! addresses from a built-in host-local IPAM and an optional anti-spoofing tc program.
//!
//! Speaks CNI spec 1.1.0 and answers configurations declaring 0.3.0, 0.3.1, 0.4.0, 1.0.0 or
//! 1.1.0 in their own version. See [`config`] for the configuration format.

pub mod bench;
mod commands;
pub mod config;
pub mod error;
pub mod invocation;
pub mod ipam;
pub mod naming;
mod pod_network;
pub mod result;
pub mod version;

use std::{
    io::{self, Read as _, Write as _},
    process::ExitCode,
};

use serde_json::{Value, json};

use crate::{
    config::NetworkConfig,
    error::CniError,
    invocation::{Invocation, Verb},
    version::SpecVersion,
};

/// What one invocation comes to: the JSON to print on stdout, if any, and whether it failed.
#[derive(Debug, PartialEq)]
pub struct Response {
    pub stdout: Option<Value>,
    pub success: bool,
}

/// A failure together with the version its error object must be written in.
struct Failure {
    error: Box<CniError>,
    version: SpecVersion,
}

impl From<CniError> for Failure {
    fn from(error: CniError) -> Self {
        Self { error: Box::new(error), version: SpecVersion::NEWEST }
    }
}

trait InVersion<T> {
    fn in_version(self, version: SpecVersion) -> Result<T, Failure>;
}

impl<T> InVersion<T> for Result<T, CniError> {
    fn in_version(self, version: SpecVersion) -> Result<T, Failure> {
        self.map_err(|error| Failure { error: Box::new(error), version })
    }
}

/// Runs one invocation: `lookup` reads the `CNI_*` variables, `stdin` is the configuration.
/// This is the one place where a [`CniError`] becomes the spec's error object.
pub fn handle(lookup: impl Fn(&str) -> Option<String>, stdin: io::Result<Vec<u8>>) -> Response {
    match dispatch(lookup, stdin) {
        Ok(stdout) => Response { stdout, success: true },
        Err(Failure { error, version }) => {
            Response { stdout: Some(error.to_json(version)), success: false }
        }
    }
}

fn dispatch(
    lookup: impl Fn(&str) -> Option<String>,
    stdin: io::Result<Vec<u8>>,
) -> Result<Option<Value>, Failure> {
    let invocation = Invocation::from_lookup(lookup)?;
    if invocation.verb == Verb::Version {
        return Ok(Some(version_report(stdin.ok().as_deref())));
    }
    let stdin = stdin.map_err(|source| CniError::Io {
        action: "reading the network configuration from stdin".to_owned(),
        source,
    })?;
    let document = config::parse_document(&stdin)?;
    let version = config::declared_version(&document)?;
    let needed = match invocation.verb {
        Verb::Check if !version.has_check() => Some(SpecVersion::V0_4_0),
        Verb::Status | Verb::Gc if !version.has_status_and_gc() => Some(SpecVersion::V1_1_0),
        _ => None,
    };
    if let Some(since) = needed {
        return Err(CniError::VerbNeedsNewerVersion {
            verb: invocation.verb.as_str(),
            since,
            declared: version,
        })
        .in_version(version);
    }
    let config = NetworkConfig::from_document(document, version).in_version(version)?;

    let attachment = invocation.attachment.as_ref();
    let netns = invocation.netns.as_deref();
    let outcome = match (invocation.verb, attachment, netns) {
        (Verb::Add, Some(attachment), Some(netns)) => {
            commands::add(&config, attachment, netns).map(Some)
        }
        (Verb::Del, Some(attachment), _) => commands::del(&config, attachment).map(|()| None),
        (Verb::Check, Some(attachment), Some(netns)) => {
            commands::check(&config, attachment, netns).map(|()| None)
        }
        (Verb::Status, _, _) => commands::status(&config).map(|()| None),
        (Verb::Gc, _, _) => commands::gc(&config).map(|()| None),
        // Invocation::from_lookup guarantees what each verb needs; this arm is unreachable
        // short of a bug there, and still answers with a proper error.
        (verb, _, _) => Err(CniError::InvalidEnvironment {
            variable: "CNI_COMMAND",
            problem: format!("{} arrived without the variables it needs", verb.as_str()),
        }),
    };
    outcome.in_version(version)
}

/// VERSION (spec §VERSION): the versions strait speaks, in the version the runtime asked in,
/// or the newest when it asked in none strait knows.
fn version_report(stdin: Option<&[u8]>) -> Value {
    let asked = stdin
        .and_then(|bytes| serde_json::from_slice::<Value>(bytes).ok())
        .and_then(|document| document.get("cniVersion")?.as_str().and_then(SpecVersion::parse))
        .unwrap_or(SpecVersion::NEWEST);
    json!({
        "cniVersion": asked.as_str(),
        "supportedVersions": SpecVersion::SUPPORTED.map(SpecVersion::as_str),
    })
}

/// Entry point of the `strait-cni` binary: environment and stdin in, JSON on stdout.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = io::stdin().read_to_end(&mut stdin).map(|_| stdin);
    let response = handle(|name| std::env::var(name).ok(), read);
    if let Some(stdout) = &response.stdout {
        let mut out = io::stdout().lock();
        // A runtime that closed our stdout learns nothing either way; the exit code still
        // tells it whether we succeeded.
        let _ = writeln!(out, "{stdout}");
        let _ = out.flush();
    }
    if response.success { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
