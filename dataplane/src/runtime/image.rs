//! What a container's `image` means in strait's process runtime.
//!
//! strait runs containers as host processes inside the pod's namespaces and cgroup; it pulls no
//! images. A container runs:
//! - its `command` (plus `args`), a host executable, when `command` is given, whatever `image`;
//! - the built-in workload when `image` is `strait/netexec` (any tag) and `command` is empty:
//!   `strait netexec` plus the container's `args`;
//! - nothing otherwise: the container waits with reason `UnsupportedImage`.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;

use super::process::resolve_program;

/// The built-in test workload (HTTP on 8080, UDP on 8081).
pub const NETEXEC_IMAGE: &str = "strait/netexec";

/// Why a container cannot start, as shown in its `state.waiting`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotRunnable {
    pub reason: &'static str,
    pub message: String,
}

/// The program and arguments a container runs.
pub fn executable(
    container: &Container,
    strait_exe: &Path,
    path_var: Option<&str>,
) -> Result<(PathBuf, Vec<String>), NotRunnable> {
    let args = container.args.clone().unwrap_or_default();
    if let Some((program, leading)) = container.command.as_deref().and_then(<[String]>::split_first)
    {
        let resolved = resolve_program(program, path_var).ok_or_else(|| NotRunnable {
            reason: "CommandNotFound",
            message: format!("{program:?} is not an executable on this node (searched PATH)"),
        })?;
        let mut all = leading.to_vec();
        all.extend(args);
        return Ok((resolved, all));
    }
    let image = container.image.as_deref().unwrap_or_default();
    if image_repository(image) == NETEXEC_IMAGE {
        let mut all = vec!["netexec".to_owned()];
        all.extend(args);
        return Ok((strait_exe.to_owned(), all));
    }
    Err(NotRunnable {
        reason: "UnsupportedImage",
        message: format!(
            "strait runs host executables and pulls no images: give the container a `command`, or use the built-in {NETEXEC_IMAGE} image (got image {image:?})"
        ),
    })
}

/// `docker.io/strait/netexec:1.0@sha256:…` → `strait/netexec`.
fn image_repository(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    // A tag is a ':' after the last '/', so registry ports (host:5000/x) are kept.
    let without_tag = match without_digest.rfind(':') {
        Some(colon) if !without_digest[colon..].contains('/') => &without_digest[..colon],
        _ => without_digest,
    };
    without_tag.strip_prefix("docker.io/").unwrap_or(without_tag)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use k8s_openapi::api::core::v1::Container;

    use super::{executable, image_repository};

    fn container(image: &str, command: Option<&[&str]>, args: Option<&[&str]>) -> Container {
        Container {
            name: "c".into(),
            image: Some(image.into()),
            command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
            args: args.map(|a| a.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn netexec_image_runs_the_builtin_workload_with_its_args() {
        let exe = Path::new("/opt/strait");
        let (program, args) = executable(
            &container("strait/netexec:1.2", None, Some(&["--udp-port", "9"])),
            exe,
            None,
        )
        .expect("runnable");
        assert_eq!(program, exe);
        assert_eq!(args, ["netexec", "--udp-port", "9"]);
    }

    #[test]
    fn a_command_runs_the_host_executable_whatever_the_image() {
        let (program, args) = executable(
            &container("busybox", Some(&["sh", "-c"]), Some(&["sleep 1"])),
            Path::new("/x"),
            Some("/bin:/usr/bin"),
        )
        .expect("runnable");
        assert!(program.ends_with("sh"));
        assert_eq!(args, ["-c", "sleep 1"]);
    }

    #[test]
    fn other_images_without_command_are_refused_with_a_reason() {
        let refused = executable(&container("nginx:1.27", None, None), Path::new("/x"), None)
            .expect_err("not runnable");
        assert_eq!(refused.reason, "UnsupportedImage");
        let missing = executable(
            &container("x", Some(&["no-such-binary-strait"]), None),
            Path::new("/x"),
            Some("/bin"),
        )
        .expect_err("missing");
        assert_eq!(missing.reason, "CommandNotFound");
    }

    #[test]
    fn repository_ignores_tag_digest_and_default_registry() {
        assert_eq!(image_repository("docker.io/strait/netexec:v1@sha256:ab"), "strait/netexec");
        assert_eq!(
            image_repository("registry:5000/strait/netexec"),
            "registry:5000/strait/netexec"
        );
    }
}
