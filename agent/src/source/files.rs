//! The manifests source (`--manifests DIR`): the objects in a directory of YAML or
//! JSON files, watched, delivered as [`SourceEvent::Resync`] of every kind on each
//! change (a complete listing: the runtime derives deletions from it).
//!
//! Files: `*.yaml`, `*.yml`, `*.json` directly in the directory (dotfiles and
//! editor backups ignored); multi-document YAML, and `kind: List` as
//! `kubectl get -o yaml` writes it. Kinds the agent does not read are ignored.
//!
//! Watching: `notify` (inotify) says something in the directory changed; after
//! [`FilesConfig::settle`] (the rest of an editor's or `kubectl cp`'s writes) the
//! directory is rescanned, and only files whose (name, inode, size, mtime) changed
//! are read again. Where inotify is unavailable (no instances left, a filesystem
//! without it), `notify`'s poll watcher looks every [`FilesConfig::poll`] instead.
//! Either way a rescan also runs every [`FilesConfig::resync`], for what no notice
//! reports (the directory itself replaced, network filesystems).
//!
//! Must not: loosen anything on bad input. A file that fails to parse (any document,
//! a `kind` or `apiVersion` that is missing or not a string included) is reported
//! with its path and document index and keeps its last good objects; an object it
//! names that was listed before stays listed as it was, even when its other file is
//! gone. The same object (kind, namespace, name) in two files is a conflict: it is
//! reported naming every file, and listed as the version listed before the conflict
//! appeared, else in its strictest reading ([`strictest`]). An unreadable directory
//! is reported as [`SourceStatus::Unreachable`] and changes nothing. Must not
//! decide policy or touch the datapath.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use super::{Object, ObjectKey, ObjectKind, SourceEvent, SourceStatus};
use crate::policy::{netpol, rule};
use crate::tables::Direction;

/// Where and how to look.
#[derive(Clone, Debug)]
pub struct FilesConfig {
    pub dir: PathBuf,
    /// How changes are noticed.
    pub watch: WatchMode,
    /// After a change is noticed, how long to wait for more before rescanning
    /// (one rescan for a burst of writes).
    pub settle: Duration,
    /// The poll watcher's interval (where inotify is unavailable).
    pub poll: Duration,
    /// A rescan at least this often, notice or not.
    pub resync: Duration,
}

/// How changes in the directory are noticed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchMode {
    /// inotify, or the poll watcher where inotify cannot be had.
    Notify,
    /// The poll watcher only.
    Poll,
}

impl FilesConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            watch: WatchMode::Notify,
            settle: Duration::from_millis(20),
            poll: Duration::from_millis(100),
            resync: Duration::from_secs(2),
        }
    }
}

/// Why a file or document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("reading the manifests directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {document}{}: not valid YAML/JSON", at_line(*.line))]
    Syntax {
        path: PathBuf,
        /// Counted from 0.
        document: usize,
        line: Option<usize>,
        #[source]
        source: serde_norway::Error,
    },
    #[error("{path}: document {document}: {kind} {name:?}: {source}")]
    Object {
        path: PathBuf,
        document: usize,
        kind: String,
        namespace: String,
        name: String,
        #[source]
        source: serde_json::Error,
    },
    /// `kind` or `apiVersion` missing, not a string, or a version of a kind the
    /// agent reads in another version: what the document is cannot be told.
    #[error(
        "{path}: document {document} ({}): {field} {value}",
        object_name(namespace, name)
    )]
    Unreadable {
        path: PathBuf,
        document: usize,
        /// `kind` or `apiVersion`.
        field: &'static str,
        /// What was found, for the message (`missing`, `5`, `"ray.io/v2": ...`).
        value: String,
        namespace: String,
        name: String,
    },
}

fn object_name(namespace: &str, name: &str) -> String {
    match (namespace.is_empty(), name.is_empty()) {
        (_, true) => "no metadata.name".to_owned(),
        (true, false) => name.to_owned(),
        (false, false) => format!("{namespace}/{name}"),
    }
}

impl FilesError {
    /// The object an unreadable document names: its kind where that much was
    /// read, its namespace and name. `None` when the document names nothing.
    fn names(&self) -> Option<(Option<ObjectKind>, ObjectKey)> {
        let (kind, namespace, name) = match self {
            FilesError::Object {
                kind,
                namespace,
                name,
                ..
            } => (kind_by_name(kind), namespace, name),
            FilesError::Unreadable {
                namespace, name, ..
            } => (None, namespace, name),
            _ => return None,
        };
        if name.is_empty() {
            return None;
        }
        Some((
            kind,
            ObjectKey {
                namespace: namespace.clone(),
                name: name.clone(),
            },
        ))
    }
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

/// What identifies a version of a file on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

type Id = (ObjectKind, ObjectKey);

/// The parsed state of the directory.
#[derive(Default)]
pub struct Manifests {
    stamps: BTreeMap<PathBuf, Stamp>,
    /// Last good objects of each file (shared with `listed`: one copy each).
    good: BTreeMap<PathBuf, Vec<Arc<Object>>>,
    /// Objects named by documents that could not be read, per file (of its
    /// current version).
    unreadable: BTreeMap<PathBuf, Vec<(Option<ObjectKind>, ObjectKey)>>,
    /// The last listing: the version of each object in force.
    listed: BTreeMap<Id, Arc<Object>>,
    /// Objects with more than one copy, as of the last listing.
    conflicts: Vec<Conflict>,
    /// Objects kept from the last listing only because an unreadable document
    /// names them.
    kept: Vec<Kept>,
    /// What the last listing changed against the one before: the events that say
    /// it ([`Manifests::take_changes`]).
    changes: Vec<SourceEvent>,
}

/// One object in more than one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub kind: ObjectKind,
    pub key: ObjectKey,
    /// Every file with a copy, in name order.
    pub files: Vec<PathBuf>,
    pub reading: Reading,
}

/// Which version of a conflicting object is listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    /// The version listed before the conflict appeared.
    Previous,
    /// None was listed before and every copy is the same: that one.
    Identical,
    /// None was listed before: [`strictest`] of the copies.
    Strictest,
    /// None was listed before and the kind has no reading stricter than every
    /// copy (a Pod's labels select it into allows as well as into isolation):
    /// not listed, as before the conflict.
    LeftOut,
}

impl Reading {
    pub fn describe(self) -> &'static str {
        match self {
            Reading::Previous => "the version in force before the conflict is kept",
            Reading::Identical => "none was in force and the copies are identical: read as written",
            Reading::Strictest => "none was in force: the strictest reading applies",
            Reading::LeftOut => "none was in force and none is stricter than every copy: left out",
        }
    }
}

/// An object kept as last listed because an unreadable document names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    pub kind: ObjectKind,
    pub key: ObjectKey,
    pub file: PathBuf,
}

impl Manifests {
    /// Rescans `dir`; `Ok(Some(errors))` when anything changed (the errors are those
    /// of the files that changed and failed), `Ok(None)` when nothing did.
    pub fn rescan(&mut self, dir: &Path) -> Result<Option<Vec<FilesError>>, FilesError> {
        let entries = std::fs::read_dir(dir).map_err(|source| FilesError::ReadDir {
            path: dir.to_owned(),
            source,
        })?;
        let mut now: BTreeMap<PathBuf, Stamp> = BTreeMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            // Follows symlinks (ConfigMap volumes are symlinks into ..data).
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            use std::os::unix::fs::MetadataExt as _;
            now.insert(
                path,
                Stamp {
                    inode: meta.ino(),
                    len: meta.len(),
                    mtime: meta.modified().ok(),
                },
            );
        }
        if now == self.stamps {
            return Ok(None);
        }
        let mut errors = Vec::new();
        self.good.retain(|path, _| now.contains_key(path));
        self.unreadable.retain(|path, _| now.contains_key(path));
        for (path, stamp) in &now {
            if self.stamps.get(path) == Some(stamp) {
                continue;
            }
            match read_file(path) {
                Ok(objects) => {
                    self.good
                        .insert(path.clone(), objects.into_iter().map(Arc::new).collect());
                    self.unreadable.remove(path);
                }
                Err(error) => {
                    let named = error.names().into_iter().collect();
                    self.unreadable.insert(path.clone(), named);
                    errors.push(error);
                }
            }
        }
        self.stamps = now;
        self.relist();
        Ok(Some(errors))
    }

    /// Recomputes the listing from every file's last good objects: conflicts
    /// resolved, objects named by unreadable documents kept.
    fn relist(&mut self) {
        let previous = std::mem::take(&mut self.listed);
        let mut copies: BTreeMap<Id, Vec<(&PathBuf, &Arc<Object>)>> = BTreeMap::new();
        for (path, objects) in &self.good {
            for object in objects {
                copies
                    .entry((object.kind(), object.key()))
                    .or_default()
                    .push((path, object));
            }
        }
        let mut listed: BTreeMap<Id, Arc<Object>> = BTreeMap::new();
        let mut conflicts = Vec::new();
        for (id, list) in copies {
            let mut files: Vec<PathBuf> = list.iter().map(|(p, _)| (*p).clone()).collect();
            files.dedup();
            let first = list[0].1;
            if list.len() == 1 {
                listed.insert(id, Arc::clone(first));
                continue;
            }
            let objects: Vec<&Object> = list.iter().map(|(_, o)| o.as_ref()).collect();
            // The version in force wins even over identical copies: editing both
            // copies the same way does not make a duplicate any less a conflict.
            let (reading, object) = if let Some(previous) = previous.get(&id) {
                (Reading::Previous, Some(Arc::clone(previous)))
            } else if objects.iter().all(|o| *o == first.as_ref()) {
                (Reading::Identical, Some(Arc::clone(first)))
            } else {
                match strictest(&objects) {
                    Some(object) => (Reading::Strictest, Some(Arc::new(object))),
                    None => (Reading::LeftOut, None),
                }
            };
            conflicts.push(Conflict {
                kind: id.0,
                key: id.1.clone(),
                files,
                reading,
            });
            if let Some(object) = object {
                listed.insert(id, object);
            }
        }
        let mut kept = Vec::new();
        for (file, named) in &self.unreadable {
            for (kind, key) in named {
                for (id, previous) in &previous {
                    let matches = &id.1 == key && kind.is_none_or(|k| k == id.0);
                    if matches && !listed.contains_key(id) {
                        listed.insert(id.clone(), Arc::clone(previous));
                        kept.push(Kept {
                            kind: id.0,
                            key: id.1.clone(),
                            file: file.clone(),
                        });
                    }
                }
            }
        }
        // What changed: an object of a file that was not re-read is the very same
        // `Arc`; one re-read is compared by content.
        let mut changes = Vec::new();
        for (id, object) in &listed {
            let same = previous
                .get(id)
                .is_some_and(|old| Arc::ptr_eq(old, object) || **old == **object);
            if !same {
                changes.push(SourceEvent::Apply(Object::clone(object)));
            }
        }
        for id in previous.keys() {
            if !listed.contains_key(id) {
                changes.push(SourceEvent::Delete(id.0, id.1.clone()));
            }
        }
        self.listed = listed;
        self.conflicts = conflicts;
        self.kept = kept;
        self.changes = changes;
    }

    /// What the last rescan changed, as events: an `Apply` for each object new or
    /// changed, a `Delete` for each one gone. After a complete listing was sent, these
    /// say the same as the next listing would, at the cost of what changed.
    pub fn take_changes(&mut self) -> Vec<SourceEvent> {
        std::mem::take(&mut self.changes)
    }

    /// The complete listing of every kind.
    pub fn listing(&self) -> BTreeMap<ObjectKind, Vec<Object>> {
        let mut listing: BTreeMap<ObjectKind, Vec<Object>> =
            ObjectKind::ALL.iter().map(|k| (*k, Vec::new())).collect();
        for ((kind, _), object) in &self.listed {
            listing
                .entry(*kind)
                .or_default()
                .push(Object::clone(object));
        }
        listing
    }

    /// Objects in more than one file, as of the last rescan that changed anything.
    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    /// Objects kept only because an unreadable document names them.
    pub fn kept(&self) -> &[Kept] {
        &self.kept
    }
}

/// The reading of conflicting copies that no copy is stricter than, for the kinds
/// that have one:
/// - RayCluster: isolated both ways with no rule of its own (`mode: DenyAll`, the
///   base flows only), no audit, no RayJob owner: every copy allows at least that;
/// - NetworkPolicy: the pods every copy selects (all of the namespace's when the
///   copies' selectors differ), isolated in every direction any copy isolates,
///   with no rule.
///
/// Other kinds: `None`.
pub fn strictest(copies: &[&Object]) -> Option<Object> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let first = copies.first()?;
    let key = first.key();
    let metadata = ObjectMeta {
        name: Some(key.name),
        namespace: (!key.namespace.is_empty()).then_some(key.namespace),
        ..ObjectMeta::default()
    };
    match first {
        Object::RayCluster(_) => Some(Object::RayCluster(Box::new(crate::crd::RayCluster {
            metadata,
            spec: crate::crd::RayClusterSpec {
                network_policy: Some(serde_json::json!({"mode": "DenyAll"})),
                ..Default::default()
            },
        }))),
        Object::NetworkPolicy(_) => {
            use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
            let specs: Vec<NetworkPolicySpec> = copies
                .iter()
                .map(|o| match o {
                    Object::NetworkPolicy(p) => p.spec.clone().unwrap_or_default(),
                    _ => NetworkPolicySpec::default(),
                })
                .collect();
            let selector = &specs[0].pod_selector;
            let pod_selector = if specs.iter().all(|s| &s.pod_selector == selector) {
                selector.clone()
            } else {
                Some(Default::default())
            };
            // A policy without policyTypes isolates ingress, and egress when it
            // has egress rules (the API server's defaulting).
            let mut types = vec!["Ingress".to_owned()];
            let egress = specs.iter().any(|s| match &s.policy_types {
                Some(types) => types.iter().any(|t| t == "Egress"),
                None => s.egress.is_some(),
            });
            if egress {
                types.push("Egress".to_owned());
            }
            Some(Object::NetworkPolicy(Box::new(NetworkPolicy {
                metadata,
                spec: Some(NetworkPolicySpec {
                    pod_selector,
                    policy_types: Some(types),
                    ingress: None,
                    egress: None,
                }),
            })))
        }
        _ => None,
    }
}

/// The kind the agent reads by that `kind`, whatever the apiVersion.
fn kind_by_name(kind: &str) -> Option<ObjectKind> {
    ObjectKind::ALL.into_iter().find(|k| k.to_string() == kind)
}

/// The API group of an apiVersion ("" for the core group's `v1`).
fn group(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(g, _)| g)
}

fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if name.starts_with('.') || name.ends_with('~') {
        return false;
    }
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Every object of a kind the agent reads in one file, trimmed to what the engine
/// reads (as the Kubernetes source trims what it watches).
pub fn read_file(path: &Path) -> Result<Vec<Object>, FilesError> {
    let text = std::fs::read_to_string(path).map_err(|source| FilesError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut objects = parse_documents(path, &text)?;
    objects.iter_mut().for_each(super::trim::trim);
    Ok(objects)
}

/// Every object of a kind the agent reads in `text` (YAML, multi-document, or JSON).
pub fn parse_documents(path: &Path, text: &str) -> Result<Vec<Object>, FilesError> {
    use serde::Deserialize as _;
    let mut objects = Vec::new();
    for (document, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_norway::Value::deserialize(de).map_err(|source| FilesError::Syntax {
            path: path.to_owned(),
            document,
            line: source.location().map(|l| l.line()),
            source,
        })?;
        if value.is_null() {
            continue;
        }
        // Through YAML's own value first: its non-string keys become JSON strings.
        let json = serde_json::to_value(&value).map_err(|source| FilesError::Object {
            path: path.to_owned(),
            document,
            kind: String::new(),
            namespace: String::new(),
            name: String::new(),
            source,
        })?;
        collect(path, document, json, &mut objects)?;
    }
    Ok(objects)
}

fn collect(
    path: &Path,
    document: usize,
    value: serde_json::Value,
    out: &mut Vec<Object>,
) -> Result<(), FilesError> {
    let text = |pointer: &str| {
        value
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let (namespace, name) = (text("/metadata/namespace"), text("/metadata/name"));
    let unreadable = |field: &'static str, found: String| FilesError::Unreadable {
        path: path.to_owned(),
        document,
        field,
        value: found,
        namespace: namespace.clone(),
        name: name.clone(),
    };
    // Without both as strings the document cannot be told from one the agent
    // reads: it is not skipped as another kind (that would drop what it was).
    let field = |field: &'static str| match value.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        None | Some(serde_json::Value::Null) => Err(unreadable(field, "missing".to_owned())),
        Some(other) => Err(unreadable(field, format!("{other} is not a string"))),
    };
    let api_version = field("apiVersion")?;
    let kind = field("kind")?;
    if kind == "List" || kind.ends_with("List") && value.get("items").is_some() {
        if let Some(serde_json::Value::Array(items)) = value.get("items") {
            for item in items {
                collect(path, document, item.clone(), out)?;
            }
        }
        return Ok(());
    }
    if let Some(expected) = kind_by_name(&kind).map(ObjectKind::api_version)
        && api_version != expected
        && group(&api_version) == group(expected)
    {
        return Err(unreadable(
            "apiVersion",
            format!("{api_version:?}: {kind} is read as {expected}"),
        ));
    }
    let Some(object_kind) = ObjectKind::from_manifest_kind(&api_version, &kind) else {
        tracing::debug!(path = %path.display(), document, %api_version, %kind, "ignoring a kind the agent does not read");
        return Ok(());
    };
    let error = |source| FilesError::Object {
        path: path.to_owned(),
        document,
        kind: kind.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
        source,
    };
    let object = match object_kind {
        ObjectKind::RayCluster => Object::RayCluster(serde_json::from_value(value).map_err(error)?),
        ObjectKind::Pod => Object::Pod(serde_json::from_value(value).map_err(error)?),
        ObjectKind::Namespace => Object::Namespace(serde_json::from_value(value).map_err(error)?),
        ObjectKind::Service => Object::Service(serde_json::from_value(value).map_err(error)?),
        ObjectKind::EndpointSlice => {
            Object::EndpointSlice(serde_json::from_value(value).map_err(error)?)
        }
        ObjectKind::NetworkPolicy => Object::NetworkPolicy(
            serde_json::from_value(mark_unknown_rule_fields(value)).map_err(error)?,
        ),
        ObjectKind::Node => Object::Node(serde_json::from_value(value).map_err(error)?),
    };
    out.push(object);
    Ok(())
}

/// A NetworkPolicy document with its rules' unknown fields listed in
/// [`netpol::UNKNOWN_RULE_FIELDS_ANNOTATION`]: read into its type they would vanish
/// and the rule would get wider (`podSelector: {matchLabel: ...}` selects every pod).
/// The API server never hands out such an object; a file can.
fn mark_unknown_rule_fields(mut value: serde_json::Value) -> serde_json::Value {
    let mut unknown = Vec::new();
    for (key, direction) in [
        ("ingress", Direction::Ingress),
        ("egress", Direction::Egress),
    ] {
        let rules = value
            .pointer(&format!("/spec/{key}"))
            .and_then(|r| r.as_array());
        for (i, rule) in rules.into_iter().flatten().enumerate() {
            if let Some(invalid) = rule::unknown_field(&format!("spec.{key}[{i}]"), direction, rule)
            {
                unknown.push(serde_json::json!({
                    "field": invalid.field,
                    "value": invalid.value,
                    "message": invalid.message,
                }));
            }
        }
    }
    if unknown.is_empty() {
        return value;
    }
    let text = serde_json::Value::Array(unknown).to_string();
    if let Some(metadata) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        let annotations = metadata
            .entry("annotations")
            .or_insert_with(|| serde_json::json!({}));
        if annotations.is_null() {
            *annotations = serde_json::json!({});
        }
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(
                netpol::UNKNOWN_RULE_FIELDS_ANNOTATION.to_owned(),
                serde_json::Value::String(text),
            );
        }
    }
    value
}

/// Watches `config.dir` until `tx` closes. Blocking: run it on its own thread.
pub fn run_blocking(config: FilesConfig, tx: mpsc::Sender<SourceEvent>) {
    let (notice_tx, notices) = std_mpsc::channel();
    // Kept for as long as the loop runs: dropping it ends the watch.
    let mut _watcher = watch(&config, notice_tx.clone());
    let mut manifests = Manifests::default();
    let mut unreachable = false;
    let mut listed = false;
    loop {
        match manifests.rescan(&config.dir) {
            Ok(None) => {}
            Ok(Some(errors)) => {
                for error in &errors {
                    tracing::warn!(error = %error, source = error_source(error), "manifest not read; its objects keep their last good state");
                }
                report(&manifests);
                // A complete listing first (what readiness waits for) and whenever
                // the directory was unreadable; after that, only what changed.
                let changes = manifests.take_changes();
                let events: Vec<SourceEvent> = if listed && !unreachable {
                    changes
                } else {
                    manifests
                        .listing()
                        .into_iter()
                        .map(|(kind, objects)| SourceEvent::Resync(kind, objects))
                        .collect()
                };
                listed = true;
                for event in events {
                    if tx.blocking_send(event).is_err() {
                        return;
                    }
                }
                if tx
                    .blocking_send(SourceEvent::Status(SourceStatus::Connected))
                    .is_err()
                {
                    return;
                }
                if unreachable {
                    // A directory that came back is another inode: watch it anew.
                    _watcher = watch(&config, notice_tx.clone());
                }
                unreachable = false;
            }
            Err(error) => {
                if !unreachable {
                    tracing::warn!(error = %error, source = error_source(&error), "manifests directory unreadable; the last state stays enforced");
                    let status = SourceStatus::Unreachable {
                        error: error.to_string(),
                    };
                    if tx.blocking_send(SourceEvent::Status(status)).is_err() {
                        return;
                    }
                    unreachable = true;
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        match notices.recv_timeout(config.resync) {
            Ok(()) => {
                std::thread::sleep(config.settle);
                while notices.try_recv().is_ok() {}
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            // Unreachable while `notice_tx` lives; never spin.
            Err(std_mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(config.resync),
        }
    }
}

/// Whether a watcher's event may mean a file changed: opening and reading (a
/// rescan's own, too) change nothing, a closed write does, and an error from the
/// watcher is taken as a change, to be sure.
pub fn changes_something(event: &notify::Result<notify::Event>) -> bool {
    match event {
        Ok(event) => match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        },
        Err(_) => true,
    }
}

/// A watcher that sends `()` on every change in `config.dir`: inotify when it can
/// be had (unless `config.watch` says poll), else the poll watcher; `None` (with
/// a warning) when neither works, leaving the periodic rescan.
fn watch(
    config: &FilesConfig,
    notices: std_mpsc::Sender<()>,
) -> Option<Box<dyn notify::Watcher + Send>> {
    let handler = move |event: notify::Result<notify::Event>| {
        if changes_something(&event) {
            let _ = notices.send(());
        }
    };
    let inotify = match config.watch {
        WatchMode::Notify => notify::recommended_watcher(handler.clone())
            .and_then(|mut w| w.watch(&config.dir, RecursiveMode::NonRecursive).map(|()| w))
            .map_err(|error| tracing::warn!(dir = %config.dir.display(), %error, poll_ms = config.poll.as_millis(), "no inotify watch on the manifests directory; polling it instead")),
        WatchMode::Poll => Err(()),
    };
    if let Ok(watcher) = inotify {
        tracing::debug!(dir = %config.dir.display(), "watching the manifests directory with inotify");
        return Some(Box::new(watcher));
    }
    let poll = notify::Config::default().with_poll_interval(config.poll);
    match notify::PollWatcher::new(handler, poll).and_then(|mut w| {
        w.watch(&config.dir, RecursiveMode::NonRecursive)
            .map(|()| w)
    }) {
        Ok(watcher) => Some(Box::new(watcher)),
        Err(error) => {
            tracing::warn!(dir = %config.dir.display(), %error, resync_ms = config.resync.as_millis(), "no watch on the manifests directory; rescanning it periodically");
            None
        }
    }
}

/// A line per conflicting object (naming every file) and per object kept for an
/// unreadable copy.
fn report(manifests: &Manifests) {
    for c in manifests.conflicts() {
        let files: Vec<String> = c.files.iter().map(|f| f.display().to_string()).collect();
        tracing::warn!(
            kind = %c.kind,
            namespace = %c.key.namespace,
            name = %c.key.name,
            files = %files.join(", "),
            reading = c.reading.describe(),
            "conflicting copies of one object in the manifests: keep one"
        );
    }
    for k in manifests.kept() {
        tracing::warn!(
            kind = %k.kind,
            namespace = %k.key.namespace,
            name = %k.key.name,
            file = %k.file.display(),
            "an unreadable copy names this object: its last good version stays in force"
        );
    }
}

fn error_source(error: &FilesError) -> String {
    std::error::Error::source(error)
        .map(|s| s.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Object>, FilesError> {
        parse_documents(Path::new("t.yaml"), text)
    }

    #[test]
    fn multi_document_yaml_and_lists_are_read_and_other_kinds_ignored() {
        let objects = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ray}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p, namespace: ray}\n\
             - apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: d}\n---\n",
        )
        .expect("parses");
        let kinds: Vec<_> = objects.iter().map(Object::kind).collect();
        assert_eq!(kinds, vec![ObjectKind::Namespace, ObjectKind::Pod]);
    }

    #[test]
    fn json_is_read() {
        let objects =
            parse(r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"n"}}"#)
                .expect("parses");
        assert_eq!(objects.len(), 1);
    }

    #[test]
    fn a_bad_document_names_the_file_and_index() {
        let e = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [oops\n")
            .expect_err("bad yaml");
        let text = e.to_string();
        assert!(
            text.contains("t.yaml") && text.contains("document 1"),
            "{text}"
        );
        let e = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: 5\n")
            .expect_err("bad pod");
        assert!(e.to_string().contains("document 0"), "{e}");
    }

    #[test]
    fn yaml_1_1_booleans_stay_strings_as_kubectl_reads_label_values() {
        let objects = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: y, tier: on, ok: no}}\n",
        )
        .expect("parses");
        let Some(Object::Namespace(ns)) = objects.first() else {
            panic!("{}", objects.len());
        };
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        let values: Vec<&str> = labels.values().map(String::as_str).collect();
        assert_eq!(values, ["y", "no", "on"], "{labels:?}");
    }

    #[test]
    fn a_syntax_error_names_the_line_too() {
        let e = parse("apiVersion: v1\nkind: Pod\nmetadata: [oops\n").expect_err("bad yaml");
        let text = e.to_string();
        assert!(
            text.contains("document 0") && text.contains("line "),
            "{text}"
        );
    }

    /// A temporary manifests directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("rf-files-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("dir");
            Self(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Runs the watcher on `dir` with a resync far beyond the test, so only a
    /// notice can make it see a change; returns the namespaces after each rescan
    /// that changed anything (the first listing, then the changes applied to it).
    fn watched(dir: &Path, watch: WatchMode) -> impl FnMut(Duration) -> Option<Vec<String>> {
        let (tx, mut rx) = mpsc::channel(64);
        let config = FilesConfig {
            watch,
            poll: Duration::from_millis(50),
            resync: Duration::from_secs(3600),
            ..FilesConfig::new(dir)
        };
        std::thread::spawn(move || run_blocking(config, tx));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let mut names = std::collections::BTreeSet::new();
        move |timeout| {
            runtime.block_on(async {
                let mut changed = false;
                loop {
                    match tokio::time::timeout(timeout, rx.recv()).await {
                        Ok(Some(SourceEvent::Resync(ObjectKind::Namespace, objects))) => {
                            names = objects.iter().map(|o| o.key().name.clone()).collect();
                            changed = true;
                        }
                        Ok(Some(SourceEvent::Apply(object))) => {
                            names.insert(object.key().name.clone());
                            changed = true;
                        }
                        Ok(Some(SourceEvent::Delete(_, key))) => {
                            names.remove(&key.name);
                            changed = true;
                        }
                        // Every rescan that changed anything ends with its status.
                        Ok(Some(SourceEvent::Status(_))) if changed => {
                            return Some(names.iter().cloned().collect());
                        }
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => return None,
                    }
                }
            })
        }
    }

    fn namespace(name: &str) -> String {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n")
    }

    fn changes_are_seen_by_notice(watch: WatchMode) {
        let dir = Dir::new(&format!("{watch:?}"));
        std::fs::write(dir.0.join("a.yaml"), namespace("a")).expect("write");
        let mut next = watched(&dir.0, watch);
        assert_eq!(next(Duration::from_secs(5)), Some(vec!["a".to_owned()]));

        // Written in place, in two steps (a burst, one consistent listing after it).
        let t0 = std::time::Instant::now();
        std::fs::write(dir.0.join("b.yaml"), "apiVersion: v1\nkind: Namespace\n").expect("w");
        std::fs::write(dir.0.join("b.yaml"), namespace("b")).expect("write");
        let mut seen = next(Duration::from_secs(5)).expect("a listing after the write");
        while seen != ["a", "b"] {
            seen = next(Duration::from_secs(5)).expect("the complete listing");
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

        // Renamed into place, as editors and ConfigMap volumes do; then removed.
        std::fs::write(dir.0.join(".c.tmp"), namespace("c")).expect("write");
        std::fs::rename(dir.0.join(".c.tmp"), dir.0.join("c.yaml")).expect("rename");
        assert_eq!(
            next(Duration::from_secs(5)),
            Some(vec!["a".to_owned(), "b".to_owned(), "c".to_owned()])
        );
        std::fs::remove_file(dir.0.join("a.yaml")).expect("rm");
        assert_eq!(
            next(Duration::from_secs(5)),
            Some(vec!["b".to_owned(), "c".to_owned()])
        );
        // Reading a file changes nothing: no new listing.
        let _ = std::fs::read_to_string(dir.0.join("b.yaml"));
        assert_eq!(next(Duration::from_millis(500)), None);
    }

    #[test]
    fn a_rescan_after_an_edit_reports_only_what_changed() {
        let dir = Dir::new("changes");
        let mut m = Manifests::default();
        std::fs::write(dir.0.join("a.yaml"), namespace("a")).expect("write");
        std::fs::write(
            dir.0.join("b.yaml"),
            format!("{}---\n{}", namespace("b1"), namespace("b2")),
        )
        .expect("write");
        m.rescan(&dir.0).expect("rescan");
        assert_eq!(
            m.take_changes().len(),
            3,
            "the first listing: every object is new"
        );
        // b.yaml edited (another length: mtimes are coarse): b1 unchanged, b2 gone,
        // b33 new; a.yaml untouched.
        std::fs::write(
            dir.0.join("b.yaml"),
            format!("{}---\n{}", namespace("b1"), namespace("b33")),
        )
        .expect("write");
        m.rescan(&dir.0).expect("rescan");
        let said: Vec<String> = m
            .take_changes()
            .iter()
            .map(|event| match event {
                SourceEvent::Apply(object) => format!("apply {}", object.key().name),
                SourceEvent::Delete(kind, key) => format!("delete {kind:?} {}", key.name),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(said, ["apply b33", "delete Namespace b2"]);
        // Nothing changed: nothing to say.
        m.rescan(&dir.0).expect("rescan");
        assert!(m.take_changes().is_empty());
    }

    #[test]
    fn inotify_notices_new_edited_renamed_and_removed_files_without_waiting_for_a_resync() {
        changes_are_seen_by_notice(WatchMode::Notify);
    }

    #[test]
    fn the_poll_watcher_notices_them_where_inotify_is_not_used() {
        changes_are_seen_by_notice(WatchMode::Poll);
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_objects() {
        let dir = std::env::temp_dir().join(format!("rf-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("a.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .expect("w");
        let mut m = Manifests::default();
        assert!(m.rescan(&dir).expect("scan").expect("changed").is_empty());
        assert_eq!(m.listing()[&ObjectKind::Namespace].len(), 1);
        std::fs::write(&file, "kind: [\n").expect("w");
        let errors = m.rescan(&dir).expect("scan").expect("changed");
        assert_eq!(errors.len(), 1);
        assert_eq!(m.listing()[&ObjectKind::Namespace].len(), 1);
        std::fs::remove_file(&file).expect("rm");
        m.rescan(&dir).expect("scan").expect("changed");
        assert!(m.listing()[&ObjectKind::Namespace].is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn raycluster(name: &str, policy: &str) -> String {
        format!(
            "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {{name: {name}, namespace: ray}}\nspec:\n  networkPolicy: {policy}\n"
        )
    }

    /// The listed RayCluster `name`'s `spec.networkPolicy`, if listed.
    fn policy_of(m: &Manifests, name: &str) -> Option<serde_json::Value> {
        m.listing()[&ObjectKind::RayCluster]
            .iter()
            .find_map(|o| match o {
                Object::RayCluster(rc) if rc.metadata.name.as_deref() == Some(name) => {
                    Some(rc.spec.network_policy.clone().unwrap_or_default())
                }
                _ => None,
            })
    }

    const CLOSED: &str = "{mode: DenyAll}";
    const OPEN: &str =
        "{mode: DenyAllIngress, head: {ingressRules: [{}]}, worker: {ingressRules: [{}]}}";

    fn scan(m: &mut Manifests, dir: &Path) -> Vec<FilesError> {
        m.rescan(dir).expect("scan").expect("changed")
    }

    #[test]
    fn a_second_copy_keeps_the_version_in_force_whichever_file_sorts_last() {
        for (first, second) in [("00-a.yaml", "zz-b.yaml"), ("zz-b.yaml", "00-a.yaml")] {
            let dir = Dir::new(&format!("conflict-{first}"));
            let mut m = Manifests::default();
            std::fs::write(dir.0.join(first), raycluster("rc", CLOSED)).expect("w");
            scan(&mut m, &dir.0);
            let closed = policy_of(&m, "rc").expect("listed");
            assert_eq!(closed["mode"], "DenyAll");

            // An open copy appears in the other file: reported, never applied.
            std::fs::write(dir.0.join(second), raycluster("rc", OPEN)).expect("w");
            scan(&mut m, &dir.0);
            assert_eq!(policy_of(&m, "rc"), Some(closed.clone()), "{second}");
            let conflicts = m.conflicts();
            assert_eq!(conflicts.len(), 1, "{conflicts:?}");
            assert_eq!(conflicts[0].reading, Reading::Previous);
            let mut files = vec![dir.0.join(first), dir.0.join(second)];
            files.sort();
            assert_eq!(conflicts[0].files, files);

            // Editing either copy while the conflict lasts changes nothing, even
            // when both then say the same.
            std::fs::write(dir.0.join(first), raycluster("rc", OPEN)).expect("w");
            scan(&mut m, &dir.0);
            assert_eq!(policy_of(&m, "rc"), Some(closed.clone()));

            // Removing one copy resolves it: the other is read as written.
            std::fs::remove_file(dir.0.join(first)).expect("rm");
            scan(&mut m, &dir.0);
            assert!(m.conflicts().is_empty());
            assert_eq!(
                policy_of(&m, "rc").expect("listed")["mode"],
                "DenyAllIngress"
            );
        }
    }

    #[test]
    fn copies_that_conflict_from_the_start_read_as_deny_all_without_rules() {
        let dir = Dir::new("conflict-start");
        std::fs::write(
            dir.0.join("a.yaml"),
            "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {name: rc, namespace: ray, annotations: {rayfence.io/audit: \"true\"}}\nspec: {networkPolicy: {mode: DenyAllEgress}}\n",
        )
        .expect("w");
        std::fs::write(dir.0.join("b.yaml"), raycluster("rc", OPEN)).expect("w");
        let mut m = Manifests::default();
        scan(&mut m, &dir.0);
        assert_eq!(m.conflicts()[0].reading, Reading::Strictest);
        let listing = m.listing();
        let Some(Object::RayCluster(rc)) = listing[&ObjectKind::RayCluster].first() else {
            panic!("listed: {listing:?}");
        };
        assert_eq!(
            rc.spec.network_policy,
            Some(serde_json::json!({"mode": "DenyAll"}))
        );
        assert!(rc.metadata.annotations.is_none(), "no audit: {rc:?}");
        assert_eq!(rc.metadata.namespace.as_deref(), Some("ray"));
    }

    #[test]
    fn identical_copies_are_reported_and_read_as_written() {
        let dir = Dir::new("conflict-same");
        std::fs::write(dir.0.join("a.yaml"), raycluster("rc", OPEN)).expect("w");
        std::fs::write(dir.0.join("b.yaml"), raycluster("rc", OPEN)).expect("w");
        let mut m = Manifests::default();
        scan(&mut m, &dir.0);
        assert_eq!(m.conflicts()[0].reading, Reading::Identical);
        assert_eq!(
            policy_of(&m, "rc").expect("listed")["mode"],
            "DenyAllIngress"
        );
    }

    /// Read into its type, `matchLabel` would vanish and the rule would admit every pod
    /// of the namespace: the rule allows nothing and the field is named instead.
    #[test]
    fn a_network_policy_rule_with_an_unknown_field_allows_nothing() {
        let dir = Dir::new("netpol-unknown");
        std::fs::write(
            dir.0.join("np.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: ray, annotations: null}\n\
             spec:\n  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchLabel: {app: x}}}]\n  \
             - from: [{podSelector: {matchLabels: {app: y}}}]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, excpt: [10.1.0.0/16]}}]\n",
        )
        .expect("w");
        let mut m = Manifests::default();
        scan(&mut m, &dir.0);
        let listing = m.listing();
        let Some(Object::NetworkPolicy(np)) = listing[&ObjectKind::NetworkPolicy].first() else {
            panic!("listed: {listing:?}");
        };
        let parsed = netpol::parse(np);
        assert!(parsed.isolate_ingress && parsed.isolate_egress);
        assert_eq!(parsed.ingress.len(), 1, "only the rule without a typo");
        assert!(
            parsed.egress.is_empty(),
            "the ipBlock with a typo allows nothing"
        );
        let fields: Vec<&str> = parsed.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.ingress[0].from[0].podSelector.matchLabel",
                "spec.egress[0].to[0].ipBlock.excpt"
            ]
        );
    }

    #[test]
    fn conflicting_network_policies_isolate_what_any_copy_does_with_no_rule() {
        let dir = Dir::new("conflict-netpol");
        let netpol = |selector: &str, extra: &str| {
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: ray}}\nspec:\n  podSelector: {selector}\n{extra}"
            )
        };
        std::fs::write(
            dir.0.join("a.yaml"),
            netpol("{matchLabels: {a: b}}", "  ingress: [{}]\n"),
        )
        .expect("w");
        std::fs::write(
            dir.0.join("b.yaml"),
            netpol(
                "{matchLabels: {a: b}}",
                "  policyTypes: [Egress]\n  egress: [{}]\n",
            ),
        )
        .expect("w");
        let mut m = Manifests::default();
        scan(&mut m, &dir.0);
        let listing = m.listing();
        let Some(Object::NetworkPolicy(np)) = listing[&ObjectKind::NetworkPolicy].first() else {
            panic!("listed: {listing:?}");
        };
        let spec = np.spec.clone().expect("spec");
        assert_eq!(
            spec.policy_types,
            Some(vec!["Ingress".to_owned(), "Egress".to_owned()])
        );
        assert!(spec.ingress.is_none() && spec.egress.is_none());
        assert_eq!(
            spec.pod_selector.expect("selector").match_labels,
            Some([("a".to_owned(), "b".to_owned())].into_iter().collect())
        );
        // Different selectors: every pod of the namespace.
        std::fs::write(dir.0.join("b.yaml"), netpol("{matchLabels: {c: d}}", "")).expect("w");
        let mut fresh = Manifests::default();
        scan(&mut fresh, &dir.0);
        let listing = fresh.listing();
        let Some(Object::NetworkPolicy(np)) = listing[&ObjectKind::NetworkPolicy].first() else {
            panic!("listed: {listing:?}");
        };
        assert_eq!(
            np.spec.clone().expect("spec").pod_selector,
            Some(Default::default())
        );
    }

    #[test]
    fn a_conflicting_pod_keeps_its_previous_version_or_stays_unlisted() {
        let dir = Dir::new("conflict-pod");
        let pod = |label: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: ray, labels: {{x: {label}}}}}\n"
            )
        };
        std::fs::write(dir.0.join("a.yaml"), pod("one")).expect("w");
        std::fs::write(dir.0.join("b.yaml"), pod("two")).expect("w");
        let mut m = Manifests::default();
        scan(&mut m, &dir.0);
        assert_eq!(m.conflicts()[0].reading, Reading::LeftOut);
        assert!(m.listing()[&ObjectKind::Pod].is_empty());
        std::fs::remove_file(dir.0.join("b.yaml")).expect("rm");
        scan(&mut m, &dir.0);
        assert_eq!(m.listing()[&ObjectKind::Pod].len(), 1);
        std::fs::write(dir.0.join("b.yaml"), pod("two")).expect("w");
        scan(&mut m, &dir.0);
        let listing = m.listing();
        let Some(Object::Pod(p)) = listing[&ObjectKind::Pod].first() else {
            panic!("{listing:?}");
        };
        assert_eq!(p.metadata.labels.as_ref().expect("labels")["x"], "one");
    }

    #[test]
    fn a_kind_or_api_version_that_is_not_a_string_keeps_the_object_in_force() {
        for (i, (field, broken)) in [
            ("kind", "apiVersion: ray.io/v1\nkind: 5\n"),
            ("kind", "apiVersion: ray.io/v1\nkind: [RayCluster]\n"),
            ("kind", "apiVersion: ray.io/v1\n"),
            ("apiVersion", "apiVersion: {a: b}\nkind: RayCluster\n"),
            ("apiVersion", "apiVersion: ray.io/v2\nkind: RayCluster\n"),
        ]
        .into_iter()
        .enumerate()
        {
            let dir = Dir::new(&format!("unreadable-{i}"));
            let file = dir.0.join("zz-rc.yaml");
            std::fs::write(&file, raycluster("rc", CLOSED)).expect("w");
            let mut m = Manifests::default();
            scan(&mut m, &dir.0);
            let text = format!(
                "{broken}metadata: {{name: rc, namespace: ray}}\nspec: {{networkPolicy: {OPEN}}}\n"
            );
            std::fs::write(&file, &text).expect("w");
            let errors = scan(&mut m, &dir.0);
            assert_eq!(errors.len(), 1, "{broken}");
            let message = errors[0].to_string();
            assert!(
                message.contains("zz-rc.yaml")
                    && message.contains(field)
                    && message.contains("ray/rc"),
                "{message}"
            );
            assert_eq!(
                policy_of(&m, "rc").expect("kept")["mode"],
                "DenyAll",
                "{broken}"
            );

            // The same copy moved to a new file while the good one goes: still kept.
            std::fs::remove_file(&file).expect("rm");
            std::fs::write(dir.0.join("00-moved.yaml"), &text).expect("w");
            scan(&mut m, &dir.0);
            assert_eq!(
                policy_of(&m, "rc").expect("kept")["mode"],
                "DenyAll",
                "{broken}"
            );
            assert_eq!(m.kept().len(), 1);
            assert_eq!(m.kept()[0].file, dir.0.join("00-moved.yaml"));

            // Fixed: read as written.
            std::fs::write(dir.0.join("00-moved.yaml"), raycluster("rc", OPEN)).expect("w");
            scan(&mut m, &dir.0);
            assert_eq!(
                policy_of(&m, "rc").expect("listed")["mode"],
                "DenyAllIngress"
            );
            assert!(m.kept().is_empty());
        }
    }

    #[test]
    fn other_kinds_and_other_groups_are_still_ignored() {
        let objects = parse(
            "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: s}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
        )
        .expect("parses");
        assert!(objects.is_empty());
    }
}
