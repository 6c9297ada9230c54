//! The fake API server's state: objects as JSON per resource, one global
//! resourceVersion counter stamped on every write (as etcd's revision is), and the
//! history of changes that watches resume from.
//!
//! It owns the API semantics that do not depend on HTTP: defaults stamped on write
//! (uid, creationTimestamp, generation, resourceVersion), conflicts, merge patches,
//! list pagination, which resourceVersions are too old (410 Gone), and how a change
//! looks to a watch with selectors (an object that stops matching is DELETED for that
//! watch, one that starts matching is ADDED). It must not do I/O: the HTTP layer
//! (`http.rs`) calls it under a lock and streams what it returns.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::resources::{self, ResourceInfo, ResourceKey};
use super::selector::{FieldSelector, LabelSelector};

/// How many changes are kept for watches to resume from before the oldest are
/// forgotten (and a resume from before them gets 410 Gone).
const HISTORY_LIMIT: usize = 100_000;
/// How many changes a slow watch may fall behind before it is ended with 410 Gone.
const BROADCAST_CAPACITY: usize = 4096;

/// An API error, sent to clients as a `Status` object with `code` as the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
        }
    }
    pub fn gone(message: impl Into<String>) -> Self {
        Self {
            code: 410,
            reason: "Expired",
            message: message.into(),
        }
    }

    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as it goes into the history and out to open watches.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub key: ResourceKey,
    pub change: ChangeType,
    /// The object after the write (for a delete: the object as it was, with the
    /// delete's resourceVersion, as a real server sends it).
    pub object: Value,
    /// The object before the write, so a watch with selectors can tell an object
    /// that stopped matching (DELETED for it) from one that never matched.
    pub old: Option<Value>,
}

/// What one watch is for: a resource, optionally one namespace, and selectors.
#[derive(Debug, Clone)]
pub struct WatchFilter {
    pub key: ResourceKey,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl WatchFilter {
    pub fn matches(&self, object: &Value) -> bool {
        let ns_ok = match &self.namespace {
            Some(ns) => {
                object
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    == Some(ns)
            }
            None => true,
        };
        ns_ok && self.labels.matches(object) && self.fields.matches(object)
    }

    /// The watch event this change is for this watch, if any.
    pub fn event_for(&self, change: &Change) -> Option<Value> {
        if change.key != self.key {
            return None;
        }
        let now = self.matches(&change.object);
        let before = change.old.as_ref().is_some_and(|o| self.matches(o));
        let kind = match (change.change, before, now) {
            (ChangeType::Deleted, _, true) => "DELETED",
            (ChangeType::Deleted, _, false) => return None,
            (_, false, false) => return None,
            (_, false, true) => "ADDED",
            (_, true, true) => "MODIFIED",
            // The object no longer matches: for this watch it is gone.
            (_, true, false) => "DELETED",
        };
        Some(json!({"type": kind, "object": change.object}))
    }
}

/// How a watch starts: the events to send first, then live changes after `from_rv`.
pub enum WatchStart {
    Stream {
        initial: Vec<Value>,
        from_rv: u64,
        changes: broadcast::Receiver<Arc<Change>>,
    },
    /// The requested resourceVersion is older than the history kept: send this
    /// ERROR event (a Status with code 410) and end the stream.
    Gone(Value),
}

/// A list request's parameters, already parsed.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    /// `resourceVersion` with `resourceVersionMatch=Exact`: only the current
    /// revision can be served exactly (there are no old snapshots).
    pub exact_rv: Option<u64>,
}

pub struct Store {
    resources: BTreeMap<ResourceKey, ResourceInfo>,
    objects: BTreeMap<ResourceKey, BTreeMap<(String, String), Value>>,
    rv: u64,
    uids: u64,
    history: VecDeque<Arc<Change>>,
    /// A watch from a resourceVersion below this gets 410 Gone.
    oldest_resumable: u64,
    changes: broadcast::Sender<Arc<Change>>,
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object
        .get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}")))
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything
/// else replaces. Strategic merge and apply patches are read the same way here.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(target) = target {
                for (k, v) in patch {
                    if v.is_null() {
                        target.remove(k);
                    } else {
                        merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            resources: resources::builtin()
                .into_iter()
                .map(|r| (r.key.clone(), r))
                .collect(),
            objects: BTreeMap::new(),
            // Like a real cluster, the first objects do not get resourceVersion 1.
            rv: 1000,
            uids: 0,
            history: VecDeque::new(),
            oldest_resumable: 0,
            changes,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn installed(&self) -> impl Iterator<Item = &ResourceInfo> {
        self.resources.values().filter(|r| r.installed)
    }

    /// The resource at this key, or 404 as a server that does not serve it answers.
    pub fn info(&self, key: &ResourceKey) -> Result<&ResourceInfo, ApiError> {
        self.resources
            .get(key)
            .filter(|r| r.installed)
            .ok_or_else(|| ApiError::not_found("the server could not find the requested resource"))
    }

    pub fn info_for_kind(&self, api_version: &str, kind: &str) -> Result<&ResourceInfo, ApiError> {
        self.resources
            .values()
            .find(|r| r.installed && r.key.api_version() == api_version && r.kind == kind)
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no installed resource for apiVersion {api_version} kind {kind}"
                ))
            })
    }

    /// Installs a CRD (known or new) and stores its CustomResourceDefinition object.
    pub fn install_crd(&mut self, group: &str, version: &str, plural: &str) {
        let key = ResourceKey::new(group, version, plural);
        let info = self
            .resources
            .entry(key.clone())
            .or_insert_with(|| ResourceInfo {
                key: key.clone(),
                kind: resources::kind_from_plural(plural),
                namespaced: true,
                installed: false,
            });
        info.installed = true;
        let (kind, namespaced) = (info.kind.clone(), info.namespaced);
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.{group}")},
            "spec": {
                "group": group,
                "names": {"plural": plural, "kind": kind},
                "scope": if namespaced { "Namespaced" } else { "Cluster" },
                "versions": [{"name": version, "served": true, "storage": true}],
            },
            "status": {"conditions": [{"type": "Established", "status": "True"}]},
        });
        let crds = ResourceKey::new("apiextensions.k8s.io", "v1", "customresourcedefinitions");
        let name = format!("{plural}.{group}");
        let existing = self.get_raw(&crds, "", &name).cloned();
        let stamped = self.stamp(&crds, "", crd, existing.as_ref());
        self.commit(crds, "", name, Some(stamped));
    }

    fn namespace_key(info: &ResourceInfo, namespace: Option<&str>) -> Result<String, ApiError> {
        match (info.namespaced, namespace) {
            (true, Some(ns)) if !ns.is_empty() => Ok(ns.to_owned()),
            (true, _) => Err(ApiError::bad_request(format!(
                "{} is namespaced: a namespace is required",
                info.key
            ))),
            (false, _) => Ok(String::new()),
        }
    }

    fn get_raw(&self, key: &ResourceKey, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(key)?
            .get(&(ns.to_owned(), name.to_owned()))
    }

    /// Fills in what the server owns: apiVersion/kind, namespace, uid,
    /// creationTimestamp, generation (bumped when spec changes) and resourceVersion
    /// (the next global revision, which `commit` then uses).
    fn stamp(
        &mut self,
        key: &ResourceKey,
        ns: &str,
        mut object: Value,
        existing: Option<&Value>,
    ) -> Value {
        let info = &self.resources[key];
        if !object.is_object() {
            object = Value::Object(Map::new());
        }
        object["apiVersion"] = json!(key.api_version());
        object["kind"] = json!(info.kind);
        if !object.get("metadata").is_some_and(Value::is_object) {
            object["metadata"] = json!({});
        }
        let uid = match existing
            .and_then(|e| meta_str(e, "uid"))
            .or_else(|| meta_str(&object, "uid"))
        {
            Some(uid) => uid.to_owned(),
            None => {
                self.uids += 1;
                format!("00000000-0000-4000-8000-{:012x}", self.uids)
            }
        };
        let created = existing
            .and_then(|e| meta_str(e, "creationTimestamp"))
            .or_else(|| meta_str(&object, "creationTimestamp"))
            .map(str::to_owned)
            .unwrap_or_else(now_rfc3339);
        let generation = match existing {
            None => 1,
            Some(e) => {
                let old = e
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                if e.get("spec") != object.get("spec") {
                    old + 1
                } else {
                    old
                }
            }
        };
        let meta = &mut object["metadata"];
        if ns.is_empty() {
            if let Some(m) = meta.as_object_mut() {
                m.remove("namespace");
            }
        } else {
            meta["namespace"] = json!(ns);
        }
        meta["uid"] = json!(uid);
        meta["creationTimestamp"] = json!(created);
        meta["generation"] = json!(generation);
        meta["resourceVersion"] = json!((self.rv + 1).to_string());
        object
    }

    /// Records a write (Some: create or update, None: delete) at the next revision.
    fn commit(
        &mut self,
        key: ResourceKey,
        ns: &str,
        name: String,
        new: Option<Value>,
    ) -> Arc<Change> {
        self.rv += 1;
        let rv = self.rv;
        let objects = self.objects.entry(key.clone()).or_default();
        let id = (ns.to_owned(), name);
        let (change, object, old) = match new {
            Some(object) => {
                let old = objects.insert(id, object.clone());
                let change = if old.is_some() {
                    ChangeType::Modified
                } else {
                    ChangeType::Added
                };
                (change, object, old)
            }
            None => {
                let mut old = objects.remove(&id).unwrap_or(Value::Null);
                let snapshot = old.clone();
                old["metadata"]["resourceVersion"] = json!(rv.to_string());
                (ChangeType::Deleted, old, Some(snapshot))
            }
        };
        let change = Arc::new(Change {
            rv,
            key,
            change,
            object,
            old,
        });
        self.history.push_back(change.clone());
        while self.history.len() > HISTORY_LIMIT {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest_resumable = dropped.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(change.clone());
        change
    }

    /// Forgets every change so far, as an etcd compaction does: a watch that resumes
    /// from any resourceVersion handed out before this call gets 410 Gone. The global
    /// revision moves on by one (as if another resource had been written, which on
    /// a real cluster is always happening), so a fresh list hands out a revision
    /// that can be watched from.
    pub fn compact_history(&mut self) {
        self.rv += 1;
        self.oldest_resumable = self.rv;
        self.history.clear();
    }

    pub fn get(
        &self,
        key: &ResourceKey,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let info = self.info(key)?;
        let ns = Self::namespace_key(info, namespace)?;
        self.get_raw(key, &ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("{} \"{name}\" not found", key.plural)))
    }

    pub fn create(
        &mut self,
        key: &ResourceKey,
        namespace: Option<&str>,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let info = self.info(key)?;
        let ns = Self::namespace_key(info, namespace)?;
        if let Some(body_ns) = meta_str(&object, "namespace")
            && info.namespaced
            && body_ns != ns
        {
            return Err(ApiError::bad_request(format!(
                "the namespace of the object ({body_ns}) does not match the namespace on the request ({ns})"
            )));
        }
        let name = match (meta_str(&object, "name"), meta_str(&object, "generateName")) {
            (Some(name), _) if !name.is_empty() => name.to_owned(),
            (_, Some(prefix)) => {
                self.uids += 1;
                let name = format!("{prefix}{:05x}", self.uids);
                object["metadata"]["name"] = json!(name);
                name
            }
            _ => {
                return Err(ApiError::bad_request(
                    "metadata.name or metadata.generateName is required",
                ));
            }
        };
        if self.get_raw(key, &ns, &name).is_some() {
            return Err(ApiError {
                code: 409,
                reason: "AlreadyExists",
                message: format!("{} \"{name}\" already exists", key.plural),
            });
        }
        if let Some(m) = object["metadata"].as_object_mut() {
            // The server owns these on create.
            m.remove("resourceVersion");
            m.remove("uid");
            m.remove("creationTimestamp");
        }
        let stamped = self.stamp(key, &ns, object, None);
        Ok(self
            .commit(key.clone(), &ns, name, Some(stamped))
            .object
            .clone())
    }

    /// PUT: replaces an existing object; a resourceVersion in the body must be the
    /// current one (optimistic concurrency), else 409 Conflict.
    pub fn replace(
        &mut self,
        key: &ResourceKey,
        namespace: Option<&str>,
        name: &str,
        object: Value,
    ) -> Result<Value, ApiError> {
        let existing = self.get(key, namespace, name)?;
        let ns = Self::namespace_key(self.info(key)?, namespace)?;
        if let Some(rv) = meta_str(&object, "resourceVersion")
            && Some(rv) != meta_str(&existing, "resourceVersion")
        {
            return Err(ApiError {
                code: 409,
                reason: "Conflict",
                message: format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    key.plural
                ),
            });
        }
        let mut object = object;
        object["metadata"]["name"] = json!(name);
        let stamped = self.stamp(key, &ns, object, Some(&existing));
        Ok(self
            .commit(key.clone(), &ns, name.to_owned(), Some(stamped))
            .object
            .clone())
    }

    /// PATCH as a JSON merge patch; with `create_if_missing` (server-side apply) a
    /// missing object is created from the patch.
    pub fn patch(
        &mut self,
        key: &ResourceKey,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        create_if_missing: bool,
    ) -> Result<Value, ApiError> {
        let ns = Self::namespace_key(self.info(key)?, namespace)?;
        let existing = self.get_raw(key, &ns, name).cloned();
        let mut object = match (&existing, create_if_missing) {
            (Some(e), _) => e.clone(),
            (None, true) => json!({"metadata": {"name": name}}),
            (None, false) => {
                return Err(ApiError::not_found(format!(
                    "{} \"{name}\" not found",
                    key.plural
                )));
            }
        };
        merge_patch(&mut object, patch);
        object["metadata"]["name"] = json!(name);
        let stamped = self.stamp(key, &ns, object, existing.as_ref());
        Ok(self
            .commit(key.clone(), &ns, name.to_owned(), Some(stamped))
            .object
            .clone())
    }

    /// Create or update, as a test's `apply` means it.
    pub fn upsert(
        &mut self,
        key: &ResourceKey,
        namespace: Option<&str>,
        object: Value,
    ) -> Result<Value, ApiError> {
        let ns = Self::namespace_key(self.info(key)?, namespace)?;
        let name = meta_str(&object, "name")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::bad_request("metadata.name is required"))?
            .to_owned();
        let existing = self.get_raw(key, &ns, &name).cloned();
        let mut object = object;
        if let Some(m) = object["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let stamped = self.stamp(key, &ns, object, existing.as_ref());
        Ok(self
            .commit(key.clone(), &ns, name, Some(stamped))
            .object
            .clone())
    }

    pub fn delete(
        &mut self,
        key: &ResourceKey,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let ns = Self::namespace_key(self.info(key)?, namespace)?;
        if self.get_raw(key, &ns, name).is_none() {
            return Err(ApiError::not_found(format!(
                "{} \"{name}\" not found",
                key.plural
            )));
        }
        Ok(self
            .commit(key.clone(), &ns, name.to_owned(), None)
            .object
            .clone())
    }

    /// Every object of a resource (all namespaces), in (namespace, name) order.
    pub fn all(&self, key: &ResourceKey) -> Vec<Value> {
        self.objects
            .get(key)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A List object, paginated with `limit`/`continue`. Simplification: a later
    /// page reads the current objects (a real server reads the first page's
    /// snapshot) but reports the first page's resourceVersion.
    pub fn list(
        &self,
        key: &ResourceKey,
        namespace: Option<&str>,
        query: &ListQuery,
    ) -> Result<Value, ApiError> {
        let info = self.info(key)?;
        if namespace.is_some() && !info.namespaced {
            return Err(ApiError::not_found(
                "the server could not find the requested resource",
            ));
        }
        if let Some(rv) = query.exact_rv
            && rv != self.rv
        {
            return Err(ApiError::gone(format!(
                "too old resource version: {rv} ({})",
                self.rv
            )));
        }
        let (list_rv, after) = match &query.continue_token {
            None => (self.rv, None),
            Some(token) => {
                let mut parts = token.splitn(3, '/');
                let rv = parts.next().and_then(|r| r.parse::<u64>().ok());
                let (ns, name) = (parts.next(), parts.next());
                match (rv, ns, name) {
                    (Some(rv), Some(ns), Some(name)) => {
                        if rv < self.oldest_resumable {
                            return Err(ApiError::gone(
                                "The provided continue parameter is too old to display a consistent list result.",
                            ));
                        }
                        (rv, Some((ns.to_owned(), name.to_owned())))
                    }
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "invalid continue token {token:?}"
                        )));
                    }
                }
            }
        };
        let filter = WatchFilter {
            key: key.clone(),
            namespace: namespace.map(str::to_owned),
            labels: query.labels.clone(),
            fields: query.fields.clone(),
        };
        let empty = BTreeMap::new();
        let objects = self.objects.get(key).unwrap_or(&empty);
        let mut matching = objects
            .iter()
            .filter(|(id, _)| after.as_ref().is_none_or(|a| *id > a))
            .filter(|(_, o)| filter.matches(o));
        let mut items = Vec::new();
        let mut last = None;
        let mut continue_token = None;
        for (id, object) in matching.by_ref() {
            if query.limit.is_some_and(|l| l > 0 && items.len() == l) {
                let (ns, name): &(String, String) = last.expect("a full page has a last item");
                continue_token = Some(format!("{list_rv}/{ns}/{name}"));
                break;
            }
            items.push(object.clone());
            last = Some(id);
        }
        let mut metadata = json!({"resourceVersion": list_rv.to_string()});
        if let Some(token) = continue_token {
            metadata["continue"] = json!(token);
        }
        Ok(json!({
            "apiVersion": key.api_version(),
            "kind": format!("{}List", info.kind),
            "metadata": metadata,
            "items": items,
        }))
    }

    /// Starts a watch. `resource_version` empty or "0" starts with a synthetic ADDED
    /// for every current object (as a real server does); a number resumes after
    /// that revision from the history, or is Gone when older than the history kept.
    /// `send_initial_events` (streaming lists) sends the current objects then a
    /// BOOKMARK annotated `k8s.io/initial-events-end`.
    pub fn watch(
        &self,
        filter: &WatchFilter,
        resource_version: &str,
        send_initial_events: bool,
    ) -> Result<WatchStart, ApiError> {
        let info = self.info(&filter.key)?;
        if filter.namespace.is_some() && !info.namespaced {
            return Err(ApiError::not_found(
                "the server could not find the requested resource",
            ));
        }
        let synthetic = |store: &Self| -> Vec<Value> {
            store
                .objects
                .get(&filter.key)
                .into_iter()
                .flat_map(|m| m.values())
                .filter(|o| filter.matches(o))
                .map(|o| json!({"type": "ADDED", "object": o}))
                .collect()
        };
        let changes = self.changes.subscribe();
        if send_initial_events || resource_version.is_empty() || resource_version == "0" {
            let mut initial = synthetic(self);
            if send_initial_events {
                initial.push(json!({
                    "type": "BOOKMARK",
                    "object": {
                        "apiVersion": filter.key.api_version(),
                        "kind": info.kind,
                        "metadata": {
                            "resourceVersion": self.rv.to_string(),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    },
                }));
            }
            return Ok(WatchStart::Stream {
                initial,
                from_rv: self.rv,
                changes,
            });
        }
        let from = parse_rv(resource_version)?;
        if from < self.oldest_resumable {
            let gone = ApiError::gone(format!(
                "too old resource version: {from} ({})",
                self.oldest_resumable
            ));
            return Ok(WatchStart::Gone(
                json!({"type": "ERROR", "object": gone.status()}),
            ));
        }
        let initial = self
            .history
            .iter()
            .filter(|c| c.rv > from)
            .filter_map(|c| filter.event_for(c))
            .collect();
        Ok(WatchStart::Stream {
            initial,
            from_rv: self.rv.max(from),
            changes,
        })
    }
}

/// Now as a Kubernetes `Time`: RFC 3339 in UTC, whole seconds.
fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> ResourceKey {
        ResourceKey::new("", "v1", "pods")
    }

    fn pod(name: &str, node: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": name}}, "spec": {"nodeName": node}})
    }

    #[test]
    fn every_write_gets_the_next_global_resource_version() {
        let mut s = Store::new();
        let a = s.upsert(&pods(), Some("ns"), pod("a", "n1")).unwrap();
        let b = s.upsert(&pods(), Some("ns"), pod("b", "n1")).unwrap();
        let a2 = s.upsert(&pods(), Some("ns"), pod("a", "n2")).unwrap();
        let rv = |o: &Value| {
            meta_str(o, "resourceVersion")
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        assert!(rv(&a) < rv(&b) && rv(&b) < rv(&a2));
        assert_eq!(meta_str(&a, "uid"), meta_str(&a2, "uid"));
        assert_eq!(a2["metadata"]["generation"], json!(2));
    }

    #[test]
    fn list_pages_with_limit_and_continue_cover_every_object_once() {
        let mut s = Store::new();
        for i in 0..5 {
            s.upsert(&pods(), Some("ns"), pod(&format!("p{i}"), "n1"))
                .unwrap();
        }
        let mut names = Vec::new();
        let mut token = None;
        loop {
            let q = ListQuery {
                limit: Some(2),
                continue_token: token.take(),
                ..Default::default()
            };
            let page = s.list(&pods(), None, &q).unwrap();
            for item in page["items"].as_array().unwrap() {
                names.push(item["metadata"]["name"].as_str().unwrap().to_owned());
            }
            match page["metadata"]["continue"].as_str() {
                Some(t) => token = Some(t.to_owned()),
                None => break,
            }
        }
        assert_eq!(names, ["p0", "p1", "p2", "p3", "p4"]);
    }

    #[test]
    fn resume_from_before_a_compaction_is_gone_but_from_a_fresh_list_is_not() {
        let mut s = Store::new();
        s.upsert(&pods(), Some("ns"), pod("a", "n1")).unwrap();
        let old = s.resource_version();
        s.compact_history();
        let filter = WatchFilter {
            key: pods(),
            namespace: None,
            labels: LabelSelector::default(),
            fields: FieldSelector::default(),
        };
        assert!(matches!(
            s.watch(&filter, &old.to_string(), false),
            Ok(WatchStart::Gone(_))
        ));
        let fresh = s.list(&pods(), None, &ListQuery::default()).unwrap();
        let rv = fresh["metadata"]["resourceVersion"].as_str().unwrap();
        assert!(matches!(
            s.watch(&filter, rv, false),
            Ok(WatchStart::Stream { .. })
        ));
    }

    #[test]
    fn an_object_that_stops_matching_a_field_selector_is_deleted_for_that_watch() {
        let mut s = Store::new();
        s.upsert(&pods(), Some("ns"), pod("a", "n1")).unwrap();
        let rv = s.resource_version().to_string();
        s.upsert(&pods(), Some("ns"), pod("a", "n2")).unwrap();
        let filter = WatchFilter {
            key: pods(),
            namespace: None,
            labels: LabelSelector::default(),
            fields: FieldSelector::parse("spec.nodeName=n1").unwrap(),
        };
        let Ok(WatchStart::Stream { initial, .. }) = s.watch(&filter, &rv, false) else {
            panic!("expected a stream");
        };
        assert_eq!(initial.len(), 1);
        assert_eq!(initial[0]["type"], "DELETED");
    }

    #[test]
    fn merge_patch_merges_objects_and_null_removes() {
        let mut target = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut target, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(target, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }
}
