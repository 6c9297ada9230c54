//! `rf-probe`: the traffic probe the datapath tests run inside pod namespaces and
//! cgroups. The command line is documented in `rayfence_tests::probe_cli`.

fn main() {
    std::process::exit(rayfence_tests::probe_cli::main());
}
