//! The datapath's error type: one variant per failure a caller can act on, carrying
//! the map, path or endpoint it concerns.
use std::path::PathBuf;

use crate::tables::EndpointId;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object (pinned maps under {pin_dir:?})")]
    Load {
        pin_dir: Option<PathBuf>,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {program} is missing from the eBPF object or has the wrong type")]
    MissingProgram { program: &'static str },
    #[error("map {map} is missing from the eBPF object")]
    MissingMap { map: &'static str },
    #[error("program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// Some entries did not fit: the endpoints they concern were switched to
    /// fail-closed (drop all but node and link-control traffic).
    #[error(
        "map {map} is full: {failed} entries could not be written; endpoints {fail_closed:?} are fail-closed"
    )]
    MapFull {
        map: &'static str,
        failed: usize,
        fail_closed: Vec<EndpointId>,
    },
    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("pinned link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not on a bpf filesystem (mount one: mount -t bpf bpffs DIR)")]
    NotBpffs { path: PathBuf },
    #[error("{path} belongs to network namespace {netns}: run this from inside it")]
    WrongNamespace { path: PathBuf, netns: u64 },
    #[error("interface {name:?} not found in the current network namespace")]
    UnknownInterface { name: String },
    #[error("{what} is attached to endpoint {attached}, not {requested}")]
    AttachedElsewhere {
        what: String,
        attached: EndpointId,
        requested: EndpointId,
    },
    #[error("endpoint {endpoint} is not attached")]
    NotAttached { endpoint: EndpointId },
    /// Replacing pinned maps (a resize or an upgrade) was refused or failed.
    #[error("replacing the pinned maps")]
    Migrate(#[source] Box<super::migrate::MigrateError>),
    #[error(
        "the eBPF object has no conntrack placeholder calls to rewrite (built from another source?)"
    )]
    KfuncPlaceholders,
}

impl DatapathError {
    pub(crate) fn map(map: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            map,
            source: Box::new(source),
        }
    }

    pub(crate) fn program(program: &'static str, source: aya::programs::ProgramError) -> Self {
        Self::Program {
            program,
            source: Box::new(source),
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
