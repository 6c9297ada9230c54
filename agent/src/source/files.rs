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
//! Must not: loosen anything on bad input. A file that fails to parse (any document)
//! is reported with its path and document index and keeps its last good objects; an
//! unreadable directory is reported as [`SourceStatus::Unreachable`] and changes
//! nothing. Must not decide policy or touch the datapath.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use super::{Object, ObjectKey, ObjectKind, SourceEvent, SourceStatus};

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
        name: String,
        #[source]
        source: serde_json::Error,
    },
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

/// The parsed state of the directory.
#[derive(Default)]
pub struct Manifests {
    stamps: BTreeMap<PathBuf, Stamp>,
    /// Last good objects of each file.
    good: BTreeMap<PathBuf, Vec<Object>>,
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
        for (path, stamp) in &now {
            if self.stamps.get(path) == Some(stamp) {
                continue;
            }
            match read_file(path) {
                Ok(objects) => {
                    self.good.insert(path.clone(), objects);
                }
                Err(error) => errors.push(error),
            }
        }
        self.stamps = now;
        Ok(Some(errors))
    }

    /// The complete listing of every kind (later files win on duplicate keys).
    pub fn listing(&self) -> BTreeMap<ObjectKind, Vec<Object>> {
        let mut by_key: BTreeMap<(ObjectKind, ObjectKey), Object> = BTreeMap::new();
        for objects in self.good.values() {
            for object in objects {
                by_key.insert((object.kind(), object.key()), object.clone());
            }
        }
        let mut listing: BTreeMap<ObjectKind, Vec<Object>> =
            ObjectKind::ALL.iter().map(|k| (*k, Vec::new())).collect();
        for ((kind, _), object) in by_key {
            listing.entry(kind).or_default().push(object);
        }
        listing
    }
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

/// Every object of a kind the agent reads in one file.
pub fn read_file(path: &Path) -> Result<Vec<Object>, FilesError> {
    let text = std::fs::read_to_string(path).map_err(|source| FilesError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_documents(path, &text)
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
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    if kind == "List" || kind.ends_with("List") && value.get("items").is_some() {
        if let Some(serde_json::Value::Array(items)) = value.get("items") {
            for item in items {
                collect(path, document, item.clone(), out)?;
            }
        }
        return Ok(());
    }
    let Some(object_kind) = ObjectKind::from_manifest_kind(&api_version, &kind) else {
        tracing::debug!(path = %path.display(), document, %api_version, %kind, "ignoring a kind the agent does not read");
        return Ok(());
    };
    let name = value
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let error = |source| FilesError::Object {
        path: path.to_owned(),
        document,
        kind: kind.clone(),
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
        ObjectKind::NetworkPolicy => {
            Object::NetworkPolicy(serde_json::from_value(value).map_err(error)?)
        }
        ObjectKind::Node => Object::Node(serde_json::from_value(value).map_err(error)?),
    };
    out.push(object);
    Ok(())
}

/// Watches `config.dir` until `tx` closes. Blocking: run it on its own thread.
pub fn run_blocking(config: FilesConfig, tx: mpsc::Sender<SourceEvent>) {
    let (notice_tx, notices) = std_mpsc::channel();
    // Kept for as long as the loop runs: dropping it ends the watch.
    let mut _watcher = watch(&config, notice_tx.clone());
    let mut manifests = Manifests::default();
    let mut unreachable = false;
    loop {
        match manifests.rescan(&config.dir) {
            Ok(None) => {}
            Ok(Some(errors)) => {
                for error in &errors {
                    tracing::warn!(error = %error, source = error_source(error), "manifest not read; its objects keep their last good state");
                }
                for (kind, objects) in manifests.listing() {
                    if tx
                        .blocking_send(SourceEvent::Resync(kind, objects))
                        .is_err()
                    {
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

/// A watcher that sends `()` on every change in `config.dir`: inotify when it can
/// be had (unless `config.watch` says poll), else the poll watcher; `None` (with
/// a warning) when neither works, leaving the periodic rescan.
fn watch(
    config: &FilesConfig,
    notices: std_mpsc::Sender<()>,
) -> Option<Box<dyn notify::Watcher + Send>> {
    let handler = move |event: notify::Result<notify::Event>| {
        // Opening and reading (the rescan's own, too) change nothing; a closed
        // write does. An error from the watcher: rescan to be sure.
        let change = match event {
            Ok(event) => match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => false,
                _ => true,
            },
            Err(_) => true,
        };
        if change {
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
    /// notice can make it see a change; returns the namespaces of each listing.
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
        move |timeout| {
            runtime.block_on(async {
                loop {
                    match tokio::time::timeout(timeout, rx.recv()).await {
                        Ok(Some(SourceEvent::Resync(ObjectKind::Namespace, objects))) => {
                            let names = objects
                                .iter()
                                .map(|o| o.key().name.clone())
                                .collect::<Vec<_>>();
                            return Some(names);
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
}
