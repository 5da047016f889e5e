//! strait's CNI plugin.

/// Entry point of the `strait-cni` binary.
pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}
