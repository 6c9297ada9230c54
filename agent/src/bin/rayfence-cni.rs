//! `rayfence-cni`: the chained CNI plugin (see `rayfence::cni::plugin`).
fn main() -> std::process::ExitCode {
    rayfence::cni::plugin::main()
}
