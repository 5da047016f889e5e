//! The CNI plugin binary that container runtimes exec; all of it lives in the `cni/` crate.
fn main() -> std::process::ExitCode {
    strait_cni::main()
}
