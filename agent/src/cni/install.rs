//! Installs and removes the chained `rayfence-cni` plugin on a node: its entry in
//! the node's CNI network configuration and its binary in the CNI bin directory.
//!
//! The configuration the container runtime uses is the first `*.conflist`,
//! `*.conf` or `*.json` file of the conf dir by lexical name order (libcni's
//! `ConfFiles`, as containerd and CRI-O load it). [`install`] appends
//! `{"type": "rayfence-cni", "bpffs": <pin dir>}` as its last plugin, the way
//! portmap and bandwidth are chained; a lone `.conf` becomes a `.conflist` wrapping
//! it (libcni's `ConfListFromConf`, as Istio's and Cilium's installers do). Every
//! other field, plugin and key order is kept ([`Json`] keeps object keys in file
//! order at every depth); whitespace is not. Files are replaced atomically (a temp
//! file renamed over them, same owner and mode), so the runtime never reads half of
//! one. The binary is copied first and the entry added second (an entry naming a
//! missing binary would fail every pod's ADD); [`uninstall`] goes the other way.
//!
//! [`spawn_keeper`] keeps the entry there while the agent runs: the primary CNI
//! (flannel, k3s) rewrites its file at start, dropping the entry.
//!
//! Must not: touch a file it cannot parse (it names the file and stops), rewrite a
//! file that already says what it should (a second install is a no-op), move an
//! existing entry (another chained installer appending after it would otherwise
//! trade places with it forever), or remove anything but the `rayfence-cni` entries
//! and binary. Nothing here uninstalls on its own: the agent leaves the plugin in
//! place when it exits, so pods stay guarded while it is down.
use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap as _, SerializeSeq as _, Serializer};

/// The plugin's `type` in a conflist, and its binary's name in the bin dir.
pub const PLUGIN_TYPE: &str = "rayfence-cni";
/// Where kubelets and container runtimes look by default.
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
/// How often [`spawn_keeper`] looks again without being told (a missed or
/// overflowed inotify event, a conf dir that did not exist yet).
pub const RECHECK: Duration = Duration::from_secs(10);
/// After a change in the conf dir, how long the keeper lets a burst of events
/// (truncate, write, close) pass before it reads. Short: until it has rewritten
/// the file, new pods are not guarded. A file read half-written (flannel and k3s
/// write theirs in place) does not parse and is left alone; its close brings
/// another event.
const SETTLE: Duration = Duration::from_millis(10);
/// The extensions libcni reads, in its `ConfFiles` order.
const EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("CNI conf dir {}: {source}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no CNI network configuration (*.conflist, *.conf, *.json) in {}: the node's CNI has not written one yet",
        dir.display()
    )]
    NoConfig { dir: PathBuf },
    #[error("{}: cannot read it: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not valid JSON, left untouched: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {what}, left untouched", path.display())]
    Shape { path: PathBuf, what: &'static str },
    #[error("{}: cannot write it: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} would not be the node's first CNI configuration once {} is converted to it ({} sorts first): left untouched",
        converted.display(), original.display(), first.display()
    )]
    ConversionOrder {
        original: PathBuf,
        converted: PathBuf,
        first: PathBuf,
    },
    #[error(
        "{} already exists beside {}, which would be converted to it: left both untouched",
        converted.display(), original.display()
    )]
    ConversionTarget {
        original: PathBuf,
        converted: PathBuf,
    },
    #[error("plugin binary {}: {source}", path.display())]
    PluginBinary {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting the thread that keeps the CNI plugin installed")]
    Thread(#[source] io::Error),
}

/// What to install where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallConfig {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The agent's pin directory as the host sees it (the plugin runs on the host).
    pub bpffs: PathBuf,
    /// The `rayfence-cni` binary to copy into `bin_dir`.
    pub plugin_binary: PathBuf,
}

/// What [`install`] did to the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfChange {
    /// Already there with this bpffs: nothing written.
    Unchanged,
    /// Appended as the last plugin.
    Added,
    /// Was there with another bpffs (this one): updated in place.
    Updated { previous: String },
    /// A lone `.conf` (this one, now removed) became the conflist, with the entry.
    Converted { from: PathBuf },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallReport {
    /// The configuration file the entry is in.
    pub conf_file: PathBuf,
    pub conf: ConfChange,
    /// The binary was copied (false: the one there was identical).
    pub binary_copied: bool,
}

impl InstallReport {
    /// Whether anything on disk changed.
    pub fn changed(&self) -> bool {
        self.binary_copied || self.conf != ConfChange::Unchanged
    }
}

impl fmt::Display for InstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.conf_file.display();
        match &self.conf {
            ConfChange::Unchanged => write!(f, "{PLUGIN_TYPE} already in {file}")?,
            ConfChange::Added => write!(f, "{PLUGIN_TYPE} added to {file}")?,
            ConfChange::Updated { previous } => {
                write!(f, "{PLUGIN_TYPE} in {file}: bpffs updated (was {previous})")?;
            }
            ConfChange::Converted { from } => write!(
                f,
                "{PLUGIN_TYPE} added to {file} (converted from {})",
                from.display()
            )?,
        }
        let binary = if self.binary_copied {
            "copied"
        } else {
            "unchanged"
        };
        write!(f, "; binary {binary}")
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UninstallReport {
    /// Files an entry was removed from.
    pub conf_files: Vec<PathBuf>,
    pub binary_removed: bool,
}

impl fmt::Display for UninstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.conf_files.is_empty() {
            write!(f, "no {PLUGIN_TYPE} entry")?;
        } else {
            let files: Vec<String> = self
                .conf_files
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            write!(f, "{PLUGIN_TYPE} removed from {}", files.join(", "))?;
        }
        let binary = if self.binary_removed {
            "removed"
        } else {
            "not there"
        };
        write!(f, "; binary {binary}")
    }
}

/// `rayfence-cni` next to the running executable (the image ships both in `/`).
pub fn default_plugin_binary() -> Result<PathBuf, InstallError> {
    let exe = std::env::current_exe().map_err(|source| InstallError::PluginBinary {
        path: PathBuf::from(PLUGIN_TYPE),
        source,
    })?;
    Ok(exe.with_file_name(PLUGIN_TYPE))
}

/// Copies the binary (unless identical) and puts the entry into the node's first
/// CNI configuration (unless there). Idempotent.
pub fn install(config: &InstallConfig) -> Result<InstallReport, InstallError> {
    // Find and check the configuration before writing anything.
    let first = first_config(&config.conf_dir)?;
    let plan = plan_install(&first, &config.conf_dir, &config.bpffs)?;
    let binary_copied = copy_binary(&config.plugin_binary, &config.bin_dir)?;
    let conf = match plan {
        Plan::Nothing => ConfChange::Unchanged,
        Plan::Rewrite { doc, change } => {
            write_atomically(&first, &doc, &first)?;
            change
        }
        Plan::Convert { doc, target } => {
            write_atomically(&target, &doc, &first)?;
            // The runtime prefers the .conf (it sorts first) until it is gone.
            fs::remove_file(&first).map_err(|source| InstallError::Write {
                path: first.clone(),
                source,
            })?;
            return Ok(InstallReport {
                conf_file: target,
                conf: ConfChange::Converted { from: first },
                binary_copied,
            });
        }
    };
    Ok(InstallReport {
        conf_file: first,
        conf,
        binary_copied,
    })
}

/// Removes every `rayfence-cni` entry from the conf dir's configurations, then the
/// binary. Idempotent; a missing directory holds nothing to remove.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<UninstallReport, InstallError> {
    let mut report = UninstallReport::default();
    let files = match config_files(conf_dir) {
        Ok(files) => files,
        Err(InstallError::ReadDir { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Vec::new()
        }
        Err(error) => return Err(error),
    };
    for path in files {
        let text = read(&path)?;
        // Not ours to judge: a file that does not name the plugin is never parsed,
        // let alone written.
        if !text.contains(PLUGIN_TYPE) {
            continue;
        }
        let mut doc = parse(&path, &text)?;
        let Some(plugins) = doc.get_mut("plugins").and_then(Json::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            write_atomically(&path, &doc, &path)?;
            report.conf_files.push(path);
        }
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => report.binary_removed = true,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(InstallError::Write {
                path: binary,
                source,
            });
        }
    }
    Ok(report)
}

/// Keeps the plugin installed while the agent runs, on a thread of its own
/// (`rf-cni`): after every change in the conf dir (inotify; the primary CNI
/// rewriting its file drops the entry) and every [`RECHECK`]. inotify makes the
/// gap after such a rewrite milliseconds instead of a polling period; the recheck
/// covers what inotify misses (queue overflow, a conf dir created later).
/// Outcomes are logged when they change (and the first). The thread lives as long
/// as the process. Fails only on what no retry mends: no plugin binary to copy.
pub fn spawn_keeper(config: InstallConfig) -> Result<(), InstallError> {
    if let Err(source) = fs::File::open(&config.plugin_binary) {
        return Err(InstallError::PluginBinary {
            path: config.plugin_binary,
            source,
        });
    }
    std::thread::Builder::new()
        .name("rf-cni".into())
        .spawn(move || keep(&config))
        .map(|_| ())
        .map_err(InstallError::Thread)
}

fn keep(config: &InstallConfig) {
    let (tx, rx) = mpsc::channel::<()>();
    let mut watcher: Option<notify::RecommendedWatcher> = None;
    // None before the first attempt; Some(None) after a success.
    let mut last_error: Option<Option<String>> = None;
    loop {
        if watcher.is_none() {
            watcher = watch(&config.conf_dir, tx.clone());
        }
        match install(config) {
            Ok(report) => {
                if report.changed() || last_error != Some(None) {
                    tracing::info!(conf_file = %report.conf_file.display(), bpffs = %config.bpffs.display(), "{report}");
                }
                last_error = Some(None);
            }
            Err(error) => {
                let text = error.to_string();
                if last_error.as_ref().and_then(Option::as_deref) != Some(text.as_str()) {
                    tracing::warn!(error = %text, "the CNI plugin is not installed; trying again on the next change");
                }
                last_error = Some(Some(text));
            }
        }
        match rx.recv_timeout(RECHECK) {
            Ok(()) => {
                std::thread::sleep(SETTLE);
                while rx.try_recv().is_ok() {}
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The watcher owns the other senders and `tx` is held here: unreachable,
            // but never spin.
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(RECHECK),
        }
    }
}

/// An inotify watch on `dir` that sends `()` on every change; `None` when it
/// cannot be had (the recheck still runs).
fn watch(dir: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher as _};
    let handler = move |event: notify::Result<notify::Event>| {
        if crate::source::files::changes_something(&event) {
            let _ = tx.send(());
        }
    };
    match notify::recommended_watcher(handler)
        .and_then(|mut w| w.watch(dir, RecursiveMode::NonRecursive).map(|()| w))
    {
        Ok(w) => Some(w),
        Err(error) => {
            tracing::debug!(dir = %dir.display(), %error, recheck_s = RECHECK.as_secs(), "no inotify watch on the CNI conf dir; rechecking periodically");
            None
        }
    }
}

enum Plan {
    Nothing,
    Rewrite { doc: Json, change: ConfChange },
    Convert { doc: Json, target: PathBuf },
}

fn plan_install(first: &Path, conf_dir: &Path, bpffs: &Path) -> Result<Plan, InstallError> {
    let bpffs = bpffs.display().to_string();
    let text = read(first)?;
    let mut doc = parse(first, &text)?;
    if !matches!(doc, Json::Object(_)) {
        return Err(shape(first, "not a JSON object"));
    }
    if first.extension().is_some_and(|e| e == "conflist") {
        let plugins = doc
            .get_mut("plugins")
            .and_then(Json::as_array_mut)
            .ok_or_else(|| shape(first, "a .conflist without a \"plugins\" list"))?;
        let change = set_entry(plugins, &bpffs);
        return Ok(match change {
            ConfChange::Unchanged => Plan::Nothing,
            change => Plan::Rewrite { doc, change },
        });
    }
    // A single network configuration (.conf, .json): libcni needs its "type".
    if doc.get("type").and_then(Json::as_str).is_none() {
        return Err(shape(
            first,
            "a single network configuration without a \"type\"",
        ));
    }
    let target = first.with_extension("conflist");
    if target.exists() {
        return Err(InstallError::ConversionTarget {
            original: first.to_owned(),
            converted: target,
        });
    }
    // The converted file must take the original's place in the order.
    let others = config_files(conf_dir)?;
    if let Some(before) = others
        .iter()
        .find(|p| p.as_path() != first && p.file_name() < target.file_name())
    {
        return Err(InstallError::ConversionOrder {
            original: first.to_owned(),
            converted: target,
            first: before.clone(),
        });
    }
    let mut list = Vec::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = doc.get(key) {
            list.push((key.to_owned(), value.clone()));
        }
    }
    let mut plugins = vec![doc];
    set_entry(&mut plugins, &bpffs);
    list.push(("plugins".to_owned(), Json::Array(plugins)));
    Ok(Plan::Convert {
        doc: Json::Object(list),
        target,
    })
}

/// Puts the entry into `plugins`: appended when absent, its bpffs set when
/// different, extra copies dropped.
fn set_entry(plugins: &mut Vec<Json>, bpffs: &str) -> ConfChange {
    let Some(at) = plugins.iter().position(is_ours) else {
        plugins.push(Json::Object(vec![
            ("type".to_owned(), Json::String(PLUGIN_TYPE.to_owned())),
            ("bpffs".to_owned(), Json::String(bpffs.to_owned())),
        ]));
        return ConfChange::Added;
    };
    let mut change = ConfChange::Unchanged;
    let mut seen = 0;
    plugins.retain(|p| {
        let ours = is_ours(p);
        seen += usize::from(ours);
        !ours || seen == 1
    });
    if seen > 1 {
        change = ConfChange::Updated {
            previous: "a duplicate entry".into(),
        };
    }
    let entry = &mut plugins[at];
    if entry.get("bpffs").and_then(Json::as_str) != Some(bpffs) {
        let previous = entry
            .get("bpffs")
            .map_or_else(|| "unset".into(), Json::describe);
        entry.set("bpffs", Json::String(bpffs.to_owned()));
        change = ConfChange::Updated { previous };
    }
    change
}

fn is_ours(plugin: &Json) -> bool {
    plugin.get("type").and_then(Json::as_str) == Some(PLUGIN_TYPE)
}

fn shape(path: &Path, what: &'static str) -> InstallError {
    InstallError::Shape {
        path: path.to_owned(),
        what,
    }
}

/// The CNI configuration files in `dir`, in the order libcni loads them.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let read_dir = |source| InstallError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e));
        // Directories are skipped; a symlink to a file counts (as in libcni).
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn first_config(dir: &Path) -> Result<PathBuf, InstallError> {
    config_files(dir)?
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig {
            dir: dir.to_owned(),
        })
}

fn read(path: &Path) -> Result<String, InstallError> {
    fs::read_to_string(path).map_err(|source| InstallError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse(path: &Path, text: &str) -> Result<Json, InstallError> {
    serde_json::from_str(text).map_err(|source| InstallError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Writes `doc` to `path` through a temp file in the same directory renamed over
/// it, with the mode (and, where allowed, the owner) of `like`, the file it
/// replaces. The temp name
/// ends in `.tmp` and starts with a dot: no runtime reads it as a configuration.
fn write_atomically(path: &Path, doc: &Json, like: &Path) -> Result<(), InstallError> {
    let write_error = |source| InstallError::Write {
        path: path.to_owned(),
        source,
    };
    let mut text = serde_json::to_vec_pretty(doc).map_err(|e| write_error(io::Error::other(e)))?;
    text.push(b'\n');
    let meta = fs::metadata(like).map_err(|source| InstallError::Read {
        path: like.to_owned(),
        source,
    })?;
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&text)?;
        let mine = file.metadata()?;
        if (mine.uid(), mine.gid()) != (meta.uid(), meta.gid()) {
            // Giving a file away needs CAP_CHOWN, which the agent does not have:
            // where it fails the file stays the agent's (uid 0, as CNI files are).
            match std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid())) {
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
                other => other?,
            }
        }
        file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(write_error)
}

/// Copies the plugin binary into `bin_dir` (temp file renamed into place: a
/// running copy is never written to) unless the one there is identical.
fn copy_binary(source: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let bytes = fs::read(source).map_err(|error| InstallError::PluginBinary {
        path: source.to_owned(),
        source: error,
    })?;
    let target = bin_dir.join(PLUGIN_TYPE);
    if fs::read(&target).is_ok_and(|there| there == bytes) {
        return Ok(false);
    }
    let tmp = temp_path(&target);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o700)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.set_permissions(fs::Permissions::from_mode(0o755))?;
        file.sync_all()?;
        fs::rename(&tmp, &target)?;
        sync_dir(&target)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|source| InstallError::Write {
        path: target,
        source,
    })?;
    Ok(true)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.rayfence.tmp"))
}

/// The rename is durable once the directory is synced.
fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// A JSON value that keeps object keys in file order at every depth (serde_json's
/// `Value` sorts them unless its `preserve_order` feature is on, which would change
/// every other `Value` in the build).
#[derive(Clone, Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Json> {
        match self {
            Json::Object(fields) => fields.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Replaces `key`'s value in place, or appends it.
    fn set(&mut self, key: &str, value: Json) {
        if let Some(slot) = self.get_mut(key) {
            *slot = value;
        } else if let Json::Object(fields) = self {
            fields.push((key.to_owned(), value));
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    fn as_array_mut(&mut self) -> Option<&mut Vec<Json>> {
        match self {
            Json::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The value as JSON text, for messages.
    fn describe(&self) -> String {
        match self {
            Json::String(s) => s.clone(),
            other => serde_json::to_string(other).unwrap_or_default(),
        }
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(v) => s.serialize_str(v),
            Json::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(fields) => {
                let mut map = s.serialize_map(Some(fields.len()))?;
                for (k, v) in fields {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct JsonVisitor;
        impl<'de> Visitor<'de> for JsonVisitor {
            type Value = Json;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
                serde_json::Number::from_f64(v)
                    .map(Json::Number)
                    .ok_or_else(|| E::custom("a number JSON cannot hold"))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::String(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Json, E> {
                Ok(Json::String(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Json>()? {
                    fields.push((k, v));
                }
                Ok(Json::Object(fields))
            }
        }
        d.deserialize_any(JsonVisitor)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A node's two CNI directories under a fresh temp dir, removed on drop.
    struct Node {
        root: PathBuf,
        conf: PathBuf,
        bin: PathBuf,
        plugin: PathBuf,
    }

    impl Node {
        fn new() -> Node {
            static N: AtomicU32 = AtomicU32::new(0);
            let root = std::env::temp_dir().join(format!(
                "rf-cni-install-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let conf = root.join("net.d");
            let bin = root.join("bin");
            fs::create_dir_all(&conf).expect("conf dir");
            fs::create_dir_all(&bin).expect("bin dir");
            let plugin = root.join("rayfence-cni-build");
            fs::write(&plugin, b"\x7fELF the plugin").expect("plugin");
            Node {
                root,
                conf,
                bin,
                plugin,
            }
        }

        fn config(&self, bpffs: &str) -> InstallConfig {
            InstallConfig {
                conf_dir: self.conf.clone(),
                bin_dir: self.bin.clone(),
                bpffs: bpffs.into(),
                plugin_binary: self.plugin.clone(),
            }
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.conf.join(name);
            fs::write(&path, text).expect("write");
            path
        }

        fn read(&self, name: &str) -> String {
            fs::read_to_string(self.conf.join(name)).expect("read")
        }

        fn names(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.conf)
                .expect("ls")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    /// What k3s writes (keys deliberately not sorted: name before cniVersion).
    const K3S_FLANNEL: &str = r#"{
  "name":"cbr0",
  "cniVersion":"1.0.0",
  "plugins":[
    {
      "type":"flannel",
      "delegate":{
        "hairpinMode":true,
        "forceAddress":true,
        "isDefaultGateway":true
      }
    },
    {
      "type":"portmap",
      "capabilities":{
        "portMappings":true
      }
    }
  ]
}
"#;

    const K3S_FLANNEL_INSTALLED: &str = r#"{
  "name": "cbr0",
  "cniVersion": "1.0.0",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "forceAddress": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    },
    {
      "type": "rayfence-cni",
      "bpffs": "/sys/fs/bpf/rayfence"
    }
  ]
}
"#;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").mode() & 0o7777
    }

    fn inode(path: &Path) -> u64 {
        fs::metadata(path).expect("stat").ino()
    }

    #[test]
    fn the_entry_goes_last_in_k3s_flannel_conflist_keeping_every_field_and_key_order() {
        let node = Node::new();
        let file = node.write("10-flannel.conflist", K3S_FLANNEL);
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).expect("chmod");
        let other = node.write("99-loopback.conf", r#"{"type": "loopback"}"#);

        let report = install(&node.config("/sys/fs/bpf/rayfence")).expect("install");
        assert_eq!(report.conf_file, file);
        assert_eq!(report.conf, ConfChange::Added);
        assert!(report.binary_copied);
        assert_eq!(node.read("10-flannel.conflist"), K3S_FLANNEL_INSTALLED);
        assert_eq!(mode(&file), 0o640, "the file keeps its mode");
        assert_eq!(
            fs::read_to_string(&other).expect("other"),
            r#"{"type": "loopback"}"#,
            "only the first configuration is touched"
        );
        assert_eq!(
            node.names(),
            ["10-flannel.conflist", "99-loopback.conf"],
            "no temp file left"
        );
        let binary = node.bin.join(PLUGIN_TYPE);
        assert_eq!(
            fs::read(&binary).expect("binary"),
            fs::read(&node.plugin).expect("plugin")
        );
        assert_eq!(mode(&binary), 0o755);
    }

    #[test]
    fn a_second_install_writes_nothing() {
        let node = Node::new();
        let file = node.write("10-flannel.conflist", K3S_FLANNEL);
        install(&node.config("/sys/fs/bpf/rayfence")).expect("first");
        let (conf_inode, bin_inode) = (inode(&file), inode(&node.bin.join(PLUGIN_TYPE)));
        let report = install(&node.config("/sys/fs/bpf/rayfence")).expect("second");
        assert_eq!(report.conf, ConfChange::Unchanged);
        assert!(!report.binary_copied);
        assert!(!report.changed());
        // A rename would have given new inodes.
        assert_eq!(inode(&file), conf_inode);
        assert_eq!(inode(&node.bin.join(PLUGIN_TYPE)), bin_inode);
        assert_eq!(node.read("10-flannel.conflist"), K3S_FLANNEL_INSTALLED);
    }

    #[test]
    fn a_changed_bpffs_is_updated_in_place_and_a_changed_binary_is_replaced() {
        let node = Node::new();
        // Another chained plugin was appended after ours: ours stays where it is.
        node.write(
            "10-flannel.conflist",
            r#"{"cniVersion": "1.0.0", "name": "cbr0", "plugins": [
                {"type": "flannel"},
                {"bpffs": "/old/pins", "type": "rayfence-cni", "extra": 1},
                {"type": "istio-cni"}]}"#,
        );
        let report = install(&node.config("/sys/fs/bpf/rayfence")).expect("install");
        assert_eq!(
            report.conf,
            ConfChange::Updated {
                previous: "/old/pins".into()
            }
        );
        let doc: serde_json::Value =
            serde_json::from_str(&node.read("10-flannel.conflist")).expect("json");
        assert_eq!(
            doc["plugins"],
            serde_json::json!([
                {"type": "flannel"},
                {"bpffs": "/sys/fs/bpf/rayfence", "type": "rayfence-cni", "extra": 1},
                {"type": "istio-cni"}
            ])
        );
        // A new version of the plugin replaces the old one.
        fs::write(&node.plugin, b"\x7fELF version 2").expect("rebuild");
        let report = install(&node.config("/sys/fs/bpf/rayfence")).expect("again");
        assert_eq!(report.conf, ConfChange::Unchanged);
        assert!(report.binary_copied);
        assert_eq!(
            fs::read(node.bin.join(PLUGIN_TYPE)).expect("binary"),
            b"\x7fELF version 2"
        );
    }

    #[test]
    fn duplicate_entries_collapse_to_the_first() {
        let node = Node::new();
        node.write(
            "10-a.conflist",
            r#"{"plugins": [{"type": "rayfence-cni", "bpffs": "/p"}, {"type": "x"},
                            {"type": "rayfence-cni", "bpffs": "/p"}]}"#,
        );
        let report = install(&node.config("/p")).expect("install");
        assert!(matches!(report.conf, ConfChange::Updated { .. }));
        let doc: serde_json::Value =
            serde_json::from_str(&node.read("10-a.conflist")).expect("json");
        assert_eq!(
            doc["plugins"],
            serde_json::json!([{"type": "rayfence-cni", "bpffs": "/p"}, {"type": "x"}])
        );
    }

    #[test]
    fn the_first_file_by_name_is_the_one_installed_into() {
        let node = Node::new();
        node.write("20-b.conflist", r#"{"plugins": [{"type": "b"}]}"#);
        node.write("05-a.conflist", r#"{"plugins": [{"type": "a"}]}"#);
        node.write("01-notes.txt", "not a CNI file");
        fs::create_dir(node.conf.join("00-dir.conflist")).expect("dir");
        let report = install(&node.config("/p")).expect("install");
        assert_eq!(report.conf_file, node.conf.join("05-a.conflist"));
        assert!(!node.read("20-b.conflist").contains(PLUGIN_TYPE));
    }

    #[test]
    fn a_lone_conf_becomes_a_conflist_and_uninstall_does_not_convert_it_back() {
        let node = Node::new();
        let conf = node.write(
            "10-bridge.conf",
            r#"{"cniVersion": "0.4.0", "name": "bridge", "type": "bridge", "bridge": "cni0",
                "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}"#,
        );
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).expect("chmod");
        let report = install(&node.config("/p")).expect("install");
        let list = node.conf.join("10-bridge.conflist");
        assert_eq!(report.conf_file, list);
        assert_eq!(report.conf, ConfChange::Converted { from: conf.clone() });
        assert_eq!(node.names(), ["10-bridge.conflist"]);
        assert_eq!(mode(&list), 0o600);
        assert_eq!(
            node.read("10-bridge.conflist"),
            r#"{
  "cniVersion": "0.4.0",
  "name": "bridge",
  "plugins": [
    {
      "cniVersion": "0.4.0",
      "name": "bridge",
      "type": "bridge",
      "bridge": "cni0",
      "ipam": {
        "type": "host-local",
        "subnet": "10.22.0.0/16"
      }
    },
    {
      "type": "rayfence-cni",
      "bpffs": "/p"
    }
  ]
}
"#
        );
        // Installed now: a second install leaves it.
        assert_eq!(
            install(&node.config("/p")).expect("again").conf,
            ConfChange::Unchanged
        );
        let removed = uninstall(&node.conf, &node.bin).expect("uninstall");
        assert_eq!(removed.conf_files, [list]);
        let doc: serde_json::Value =
            serde_json::from_str(&node.read("10-bridge.conflist")).expect("json");
        assert_eq!(doc["plugins"].as_array().map(Vec::len), Some(1));
        assert_eq!(doc["plugins"][0]["type"], "bridge");
    }

    #[test]
    fn a_conversion_that_would_lose_its_place_or_clobber_a_file_is_refused() {
        let node = Node::new();
        let conf = node.write("10-bridge.conf", r#"{"type": "bridge"}"#);
        node.write("10-bridge.conflist", r#"{"plugins": [{"type": "old"}]}"#);
        let error = install(&node.config("/p")).expect_err("target exists");
        assert!(
            matches!(error, InstallError::ConversionTarget { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("10-bridge.conflist"), "{error}");
        assert_eq!(node.read("10-bridge.conf"), r#"{"type": "bridge"}"#);
        assert!(!node.bin.join(PLUGIN_TYPE).exists());

        let node = Node::new();
        node.write("10-bridge.conf", r#"{"type": "bridge"}"#);
        // "10-bridge.conf.json" sorts between "10-bridge.conf" and "10-bridge.conflist".
        node.write("10-bridge.conf.json", r#"{"type": "other"}"#);
        let error = install(&node.config("/p")).expect_err("order");
        assert!(
            matches!(error, InstallError::ConversionOrder { .. }),
            "{error}"
        );
        assert!(conf.exists());
    }

    #[test]
    fn malformed_json_is_refused_naming_the_file_and_left_untouched() {
        let node = Node::new();
        let broken = "{\"plugins\": [{\"type\": \"flannel\"},";
        let file = node.write("10-flannel.conflist", broken);
        let error = install(&node.config("/p")).expect_err("malformed");
        assert!(matches!(error, InstallError::Parse { .. }), "{error}");
        assert!(
            error.to_string().contains(&*file.to_string_lossy()),
            "{error}"
        );
        assert_eq!(node.read("10-flannel.conflist"), broken);
        assert!(
            !node.bin.join(PLUGIN_TYPE).exists(),
            "nothing is installed when the configuration cannot be"
        );
        // Well-formed JSON of the wrong shape: also named, also untouched.
        for (name, text) in [
            ("10-flannel.conflist", r#"{"plugins": {"type": "flannel"}}"#),
            ("10-flannel.conflist", r#"[1, 2]"#),
        ] {
            node.write(name, text);
            let error = install(&node.config("/p")).expect_err(text);
            assert!(error.to_string().contains(name), "{error}");
            assert_eq!(node.read(name), text);
        }
        // Uninstall refuses a file it would have to edit but cannot read.
        let ours = "{\"plugins\": [{\"type\": \"rayfence-cni\"}";
        node.write("10-flannel.conflist", ours);
        let error = uninstall(&node.conf, &node.bin).expect_err("malformed");
        assert!(error.to_string().contains("10-flannel.conflist"), "{error}");
        assert_eq!(node.read("10-flannel.conflist"), ours);
        // ... and ignores one that does not name the plugin.
        node.write("10-flannel.conflist", broken);
        assert_eq!(
            uninstall(&node.conf, &node.bin).expect("not ours"),
            UninstallReport::default()
        );
    }

    #[test]
    fn no_configuration_or_no_binary_is_an_error_naming_it() {
        let node = Node::new();
        let error = install(&node.config("/p")).expect_err("empty dir");
        assert!(matches!(error, InstallError::NoConfig { .. }), "{error}");
        assert!(error.to_string().contains(&*node.conf.to_string_lossy()));

        node.write("10-flannel.conflist", K3S_FLANNEL);
        let mut config = node.config("/p");
        config.plugin_binary = node.root.join("missing");
        let error = install(&config).expect_err("no binary");
        assert!(error.to_string().contains("missing"), "{error}");
        assert_eq!(node.read("10-flannel.conflist"), K3S_FLANNEL);
        assert!(matches!(
            spawn_keeper(config),
            Err(InstallError::PluginBinary { .. })
        ));
    }

    #[test]
    fn uninstall_removes_exactly_the_entry_and_the_binary_and_twice_is_a_no_op() {
        let node = Node::new();
        let file = node.write("10-flannel.conflist", K3S_FLANNEL);
        install(&node.config("/sys/fs/bpf/rayfence")).expect("install");
        fs::write(node.bin.join("portmap"), b"portmap").expect("portmap");
        let report = uninstall(&node.conf, &node.bin).expect("uninstall");
        assert_eq!(report.conf_files, std::slice::from_ref(&file));
        assert!(report.binary_removed);
        let expected: serde_json::Value = serde_json::from_str(K3S_FLANNEL).expect("json");
        let now: serde_json::Value =
            serde_json::from_str(&node.read("10-flannel.conflist")).expect("json");
        assert_eq!(now, expected);
        let text = node.read("10-flannel.conflist");
        assert!(
            text.find("\"name\"") < text.find("\"cniVersion\""),
            "{text}"
        );
        assert!(!node.bin.join(PLUGIN_TYPE).exists());
        assert!(node.bin.join("portmap").exists());

        let inode_before = inode(&file);
        let again = uninstall(&node.conf, &node.bin).expect("twice");
        assert_eq!(again, UninstallReport::default());
        assert_eq!(inode(&file), inode_before, "nothing rewritten");
        // A directory that does not exist holds nothing to remove.
        let gone = node.root.join("absent");
        assert_eq!(
            uninstall(&gone, &gone).expect("absent"),
            UninstallReport::default()
        );
    }

    #[test]
    fn json_keeps_key_order_and_numbers() {
        let text = r#"{"z": 1, "a": [true, null, -3, 1.5, 18446744073709551615], "m": {"y": "", "b": {}}}"#;
        let doc: Json = serde_json::from_str(text).expect("parse");
        assert_eq!(
            serde_json::to_string(&doc).expect("write"),
            text.replace(", ", ",").replace(": ", ":")
        );
    }
}
