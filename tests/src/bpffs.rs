//! Pin directories under `/sys/fs/bpf` for the demo and the tests, on a machine
//! that may have no bpf filesystem mounted there yet: the agent's own
//! check-and-mount ([`rayfence::datapath::bpffs::ensure_mounted`]) runs first, so
//! nothing depends on another test or an earlier run having mounted it.

use std::path::Path;

use anyhow::{Context as _, Result};

/// Makes sure `dir` (which need not exist) is on a bpf filesystem, mounting one
/// at `/sys/fs/bpf` if it is missing there.
pub fn ensure_mounted(dir: &Path) -> Result<()> {
    rayfence::datapath::bpffs::ensure_mounted(dir)
        .with_context(|| format!("a bpf filesystem for {}", dir.display()))
}

/// Creates `dir` on a bpf filesystem ([`ensure_mounted`] first).
pub fn create_dir(dir: &Path) -> Result<()> {
    ensure_mounted(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating bpffs dir {}", dir.display()))
}
