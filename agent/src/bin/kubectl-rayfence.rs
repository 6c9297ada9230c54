//! `kubectl-rayfence`: the kubectl plugin `kubectl rayfence` (see `rayfence::kubectl`).
fn main() -> std::process::ExitCode {
    rayfence::kubectl::main()
}
