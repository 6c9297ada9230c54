//! `rayfence cleanup`: detach and remove everything the agent pinned under its bpffs
//! directory (links first, so nothing enforces with half-removed maps), then the
//! maps and the directory. Safe to run twice. clsact filters (kernels without TCX)
//! are found through their marker directories and removed only from inside the
//! network namespace they were attached in (the agent's, normally the host's).
use std::path::Path;

use aya::programs::links::PinnedLink;

use super::{DatapathError, paths};

/// What [`cleanup`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub links: usize,
    pub maps: usize,
}

pub fn cleanup(dir: &Path) -> Result<CleanupReport, DatapathError> {
    let mut report = CleanupReport::default();
    if !dir.exists() {
        return Ok(report);
    }
    let links = paths::links_dir(dir);
    for path in entries(&links)? {
        if path.is_dir() {
            // A clsact filter's marker (kernels without TCX).
            super::attach::detach_clsact(&path)?;
            report.links += 1;
            continue;
        }
        match PinnedLink::from_pin(&path) {
            Ok(link) => {
                // Unpinning drops the last reference: the link detaches.
                link.unpin()
                    .map_err(|e| DatapathError::io("unpinning", &path, e))?;
            }
            Err(_) => {
                std::fs::remove_file(&path).map_err(|e| DatapathError::io("removing", &path, e))?
            }
        }
        report.links += 1;
    }
    let maps = paths::maps_dir(dir);
    for path in entries(&maps)? {
        std::fs::remove_file(&path).map_err(|e| DatapathError::io("removing", &path, e))?;
        report.maps += 1;
    }
    let progs = paths::progs_dir(dir);
    for path in entries(&progs)? {
        std::fs::remove_file(&path).map_err(|e| DatapathError::io("removing", &path, e))?;
    }
    for sub in [links, maps, progs] {
        if sub.exists() {
            std::fs::remove_dir(&sub).map_err(|e| DatapathError::io("removing", &sub, e))?;
        }
    }
    std::fs::remove_dir(dir).map_err(|e| DatapathError::io("removing", dir, e))?;
    Ok(report)
}

fn entries(dir: &Path) -> Result<Vec<std::path::PathBuf>, DatapathError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let read = std::fs::read_dir(dir).map_err(|e| DatapathError::io("listing", dir, e))?;
    let mut paths = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| DatapathError::io("listing", dir, e))?;
        paths.push(entry.path());
    }
    Ok(paths)
}
