//! Where the kubelet puts a pod's cgroup v2 directory, and its cgroup id.
//!
//! The kubelet names a pod cgroup `[<--cgroup-root>..., "kubepods", <qos>?, "pod<uid>"]`
//! (no QoS component for Guaranteed pods) and renders that name per cgroup driver:
//!
//! | driver   | Burstable / BestEffort                                                     | Guaranteed |
//! |----------|----------------------------------------------------------------------------|------------|
//! | systemd  | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` | `kubepods.slice/kubepods-pod<uid_>.slice` |
//! | cgroupfs | `kubepods/burstable/pod<uid>`                                               | `kubepods/pod<uid>` |
//!
//! (`<uid_>`: the UID with `-` escaped to `_`, as systemd unit names need.) A
//! kubelet `--cgroup-root` adds leading components; with the systemd driver they
//! nest as slices (`/kube` -> `kube.slice/kube-kubepods.slice/...`).
//!
//! Every candidate is checked on disk under the cgroup2 mount; when none exists a
//! bounded walk of the tree looks for a directory named after the UID (nested
//! kubelets, e.g. kind, put the whole tree below some other cgroup). The cgroup id
//! is the directory's inode number: what `bpf_skb_cgroup_id` and
//! `bpf_get_current_cgroup_id` return for cgroup v2 on 64-bit kernels (kernfs
//! node ids are inode numbers since Linux 5.5).
//!
//! Hybrid hosts mount cgroup v2 at `/sys/fs/cgroup/unified`; with the systemd
//! driver systemd mirrors the kubepods slices there, with the cgroupfs driver the
//! kubelet only populates the v1 hierarchies, so there is no v2 pod cgroup to find.
//! The v1 hierarchies are read only to say so ([`LayoutProblem`],
//! [`v1_pod_cgroup`]): the agent never uses a v1 cgroup, since the cgroup hook and
//! the socket cgroup ids the datapath reads are cgroup v2's.
//!
//! The container runtime does not change where the pod cgroup is: containerd names
//! the container cgroups below it `cri-containerd-<id>.scope` (systemd driver) or
//! `<id>` (cgroupfs), CRI-O `crio-<id>.scope` / `crio-<id>`, with a
//! `crio-conmon-<id>[.scope]` sibling holding conmon, a process of the node's
//! network namespace. Nothing here looks below the pod cgroup but [`pids_below`],
//! whose pids therefore may be in the node's namespace too (see
//! `host_if::via_pod_netns`).
//!
//! This module only reads the cgroup filesystem: it must never create, move or
//! delete a cgroup or write any cgroup file.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// A pod's QoS class as the API server reports it (`status.qosClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [
        QosClass::Guaranteed,
        QosClass::Burstable,
        QosClass::BestEffort,
    ];

    /// Parses `status.qosClass` (`Guaranteed`, `Burstable`, `BestEffort`).
    pub fn from_api(value: &str) -> Option<Self> {
        match value {
            "Guaranteed" => Some(QosClass::Guaranteed),
            "Burstable" => Some(QosClass::Burstable),
            "BestEffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }

    /// The kubelet's cgroup name component for the class; Guaranteed pods sit
    /// directly under `kubepods`.
    pub fn kubelet_component(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

/// The kubelet's `--cgroup-driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// How a pod cgroup was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupFoundBy {
    /// The kubelet layout of this driver, under this kubelet `--cgroup-root`.
    KubeletLayout {
        driver: CgroupDriver,
        kubelet_root: String,
    },
    /// A walk of the tree found a directory named after the UID.
    Search,
}

/// A pod's cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroupInfo {
    /// Absolute path (under the cgroup2 mount).
    pub path: PathBuf,
    /// Path relative to the cgroup2 root, with a leading `/` (as in
    /// `/proc/PID/cgroup`).
    pub relative: PathBuf,
    /// The cgroup id (directory inode), what `bpf_skb_cgroup_id` returns.
    pub id: u64,
    /// Depth below the cgroup2 root (the root is level 0), the `ancestor_level`
    /// to give `bpf_skb_ancestor_cgroup_id` for a packet of a process in a child.
    pub level: u32,
    pub found_by: CgroupFoundBy,
}

/// The cgroup2 mount, from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// Where it is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
    /// hybrid hosts).
    pub mount_point: PathBuf,
    /// The cgroup the mount shows as its root (`/` unless a sub-tree or a
    /// cgroup namespace is mounted): its depth adds to every level.
    pub root: PathBuf,
}

/// The first cgroup2 mount in the text of a `mountinfo` file.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<Cgroup2Mount> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <src> <opts>"
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        Some(Cgroup2Mount {
            mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
            root: PathBuf::from(unescape_mountinfo(root)),
        })
    })
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Reads `mountinfo_path` (normally `/proc/self/mountinfo`) for the cgroup2 mount.
pub fn find_cgroup2_mount(mountinfo_path: &Path) -> io::Result<Option<Cgroup2Mount>> {
    Ok(parse_cgroup2_mount(&fs::read_to_string(mountinfo_path)?))
}

/// A cgroup v1 hierarchy, from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupV1Mount {
    pub mount_point: PathBuf,
    /// Its controllers (`cpu`, `pids`, `name=systemd`), from the super options.
    pub controllers: Vec<String>,
}

/// Every cgroup v1 hierarchy in the text of a `mountinfo` file.
pub fn parse_cgroup_v1_mounts(mountinfo: &str) -> Vec<CgroupV1Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut super_fields = right.split_whitespace();
            if super_fields.next() != Some("cgroup") {
                return None;
            }
            let options = super_fields.nth(1).unwrap_or("");
            let mount_point = left.split_whitespace().nth(4)?;
            Some(CgroupV1Mount {
                mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
                controllers: options
                    .split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains("release_agent"))
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

/// Why the kubelet's cgroup layout on this node cannot give the agent what it
/// needs, found at start ([`layout_problem`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutProblem {
    /// The kubelet's `kubepods` roots exist in cgroup v1 hierarchies but under none
    /// of the kubelet roots of the cgroup2 mount: the cgroupfs driver on a hybrid
    /// host.
    PodsInV1Only {
        v1_roots: Vec<PathBuf>,
        cgroup2: PathBuf,
    },
}

impl std::fmt::Display for LayoutProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayoutProblem::PodsInV1Only { v1_roots, cgroup2 } => write!(
                f,
                "the kubelet's pod cgroups are in cgroup v1 only ({}), none under the cgroup2 \
                 mount {}: the cgroupfs cgroup driver on a hybrid host. Pods without a host \
                 veth cannot be enforced here (they stay pending), and hostNetwork pods cannot \
                 be told from the node, so no process counts as the node: a node address is \
                 only an address (kubelet probes need an ipBlock covering the node, as on the \
                 cgroup hook); run the kubelet with the systemd cgroup driver, or the node \
                 with cgroup v2 only",
                display_paths(v1_roots),
                cgroup2.display()
            ),
        }
    }
}

/// `a, b, c`.
pub fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The kubelet's `kubepods` roots under the cgroup v1 hierarchies `v1`.
pub fn v1_kubepods_roots(v1: &[CgroupV1Mount], kubelet_roots: &[String]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for hierarchy in v1 {
        for root in roots_or_default(kubelet_roots) {
            let mut name = kubelet_root_components(root);
            name.push("kubepods".into());
            for path in [systemd_path(&name), cgroupfs_path(&name)] {
                let path = hierarchy.mount_point.join(path);
                if path.is_dir() {
                    found.push(path);
                }
            }
        }
    }
    found
}

/// Whether the pod cgroups are somewhere the agent cannot use: `kubepods` roots in
/// cgroup v1 and none under the cgroup2 mount.
pub fn layout_problem(
    mount: &Cgroup2Mount,
    v1: &[CgroupV1Mount],
    kubelet_roots: &[String],
) -> Option<LayoutProblem> {
    let v1_roots = v1_kubepods_roots(v1, kubelet_roots);
    if v1_roots.is_empty() || !pod_cgroup_roots(mount, kubelet_roots, &[]).is_empty() {
        return None;
    }
    Some(LayoutProblem::PodsInV1Only {
        v1_roots,
        cgroup2: mount.mount_point.clone(),
    })
}

/// Every cgroup directly below the cgroup2 mount, with its id: where a layout
/// cannot tell pods' processes from the node's ([`LayoutProblem::PodsInV1Only`]),
/// the roots under which every socket is some pod's, never the node's (a socket of
/// the root cgroup itself, kernel threads', has no ancestor to match).
pub fn every_top_level_cgroup(mount: &Cgroup2Mount) -> Vec<(PathBuf, u64)> {
    let Ok(entries) = fs::read_dir(&mount.mount_point) else {
        return Vec::new();
    };
    let mut found: Vec<(PathBuf, u64)> = entries
        .flatten()
        .filter_map(|entry| {
            let meta = entry.metadata().ok().filter(|m| m.is_dir())?;
            Some((entry.path(), meta.ino()))
        })
        .collect();
    found.sort();
    found
}

/// The pod's cgroup in a cgroup v1 hierarchy, by the kubelet's layouts: where it is
/// when it has none in cgroup v2 (the cgroupfs driver on a hybrid host).
pub fn v1_pod_cgroup(
    v1: &[CgroupV1Mount],
    kubelet_roots: &[String],
    qos: Option<QosClass>,
    uid: &str,
) -> Option<PathBuf> {
    let candidates = candidate_paths(kubelet_roots, qos, uid);
    v1.iter().find_map(|hierarchy| {
        candidates
            .iter()
            .map(|(relative, _)| hierarchy.mount_point.join(relative))
            .find(|path| path.is_dir())
    })
}

fn roots_or_default(kubelet_roots: &[String]) -> &[String] {
    static DEFAULT_ROOT: std::sync::LazyLock<[String; 1]> =
        std::sync::LazyLock::new(|| ["/".to_owned()]);
    if kubelet_roots.is_empty() {
        &DEFAULT_ROOT[..]
    } else {
        kubelet_roots
    }
}

/// The components of a kubelet `--cgroup-root` value: `/` -> `[]`, `/kube/x` ->
/// `[kube, x]`; a systemd form (`/kube.slice/kube-x.slice`) gives the same
/// components, as the kubelet's `ParseSystemdToCgroupName` does.
pub fn kubelet_root_components(kubelet_root: &str) -> Vec<String> {
    let parts: Vec<&str> = kubelet_root.split('/').filter(|p| !p.is_empty()).collect();
    match parts.last() {
        Some(last) if last.ends_with(".slice") => last
            .trim_end_matches(".slice")
            .split('-')
            .filter(|p| !p.is_empty())
            .map(|p| p.replace('_', "-"))
            .collect(),
        _ => parts.into_iter().map(str::to_owned).collect(),
    }
}

/// The kubelet's cgroup name of a pod: `[root..., kubepods, qos?, pod<uid>]`.
pub fn pod_cgroup_name(kubelet_root: &str, qos: QosClass, uid: &str) -> Vec<String> {
    let mut name = kubelet_root_components(kubelet_root);
    name.push("kubepods".into());
    if let Some(q) = qos.kubelet_component() {
        name.push(q.into());
    }
    name.push(format!("pod{uid}"));
    name
}

/// The systemd driver's rendering of a cgroup name (the kubelet's `ToSystemd`
/// followed by systemd's slice expansion): each prefix becomes a nested slice,
/// with `-` inside a component escaped to `_`.
pub fn systemd_path(name: &[String]) -> PathBuf {
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for component in name {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(&component.replace('-', "_"));
        path.push(format!("{prefix}.slice"));
    }
    path
}

/// The cgroupfs driver's rendering: the components as directories.
pub fn cgroupfs_path(name: &[String]) -> PathBuf {
    name.iter().collect()
}

/// Every place the kubelet may have put this pod's cgroup, relative to the
/// cgroup2 root, in the order they are tried: for each kubelet root, for each
/// QoS class (the given one, or all three when unknown), systemd then cgroupfs.
pub fn candidate_paths(
    kubelet_roots: &[String],
    qos: Option<QosClass>,
    uid: &str,
) -> Vec<(PathBuf, CgroupFoundBy)> {
    let classes: Vec<QosClass> = match qos {
        Some(q) => vec![q],
        None => QosClass::ALL.to_vec(),
    };
    let default_root = ["/".to_owned()];
    let roots = if kubelet_roots.is_empty() {
        &default_root[..]
    } else {
        kubelet_roots
    };
    let mut out = Vec::new();
    for root in roots {
        for &class in &classes {
            let name = pod_cgroup_name(root, class, uid);
            for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
                let path = match driver {
                    CgroupDriver::Systemd => systemd_path(&name),
                    CgroupDriver::Cgroupfs => cgroupfs_path(&name),
                };
                out.push((
                    path,
                    CgroupFoundBy::KubeletLayout {
                        driver,
                        kubelet_root: root.clone(),
                    },
                ));
            }
        }
    }
    out
}

/// The kubelet's pod cgroup roots (`kubepods.slice` for the systemd driver,
/// `kubepods` for cgroupfs, below each kubelet `--cgroup-root`) that exist under
/// the mount, and the `kubepods` ancestors of `located` pod cgroups (nested
/// kubelets put the tree elsewhere): every process below one is some pod's, never
/// the node's own (docs/semantics.md "What counts as the node").
pub fn pod_cgroup_roots(
    mount: &Cgroup2Mount,
    kubelet_roots: &[String],
    located: &[PathBuf],
) -> Vec<(PathBuf, u64)> {
    let default_root = ["/".to_owned()];
    let roots = if kubelet_roots.is_empty() {
        &default_root[..]
    } else {
        kubelet_roots
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for root in roots {
        let mut name = kubelet_root_components(root);
        name.push("kubepods".into());
        for path in [systemd_path(&name), cgroupfs_path(&name)] {
            found.push(mount.mount_point.join(path));
        }
    }
    for pod in located {
        // The outermost ancestor whose name starts with `kubepods`.
        let outermost = pod
            .ancestors()
            .skip(1)
            .take_while(|dir| dir.starts_with(&mount.mount_point))
            .filter(|dir| {
                dir.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("kubepods"))
            })
            .last();
        found.extend(outermost.map(Path::to_path_buf));
    }
    found.sort();
    found.dedup();
    found
        .into_iter()
        .filter_map(|path| {
            let id = fs::metadata(&path).ok().filter(|m| m.is_dir())?.ino();
            Some((path, id))
        })
        .collect()
}

/// The directory names a pod cgroup may have, whatever the driver: they end in
/// `pod<uid>` (cgroupfs) or `pod<uid_>.slice` (systemd).
pub fn is_pod_dir_name(dir_name: &str, uid: &str) -> bool {
    let escaped = uid.replace('-', "_");
    dir_name == format!("pod{uid}")
        || (dir_name.ends_with(&format!("pod{escaped}.slice")) && dir_name.starts_with("kube"))
}

/// Limits of the fallback walk: deep enough for nested kubelets, bounded so a
/// huge tree cannot stall the agent.
const SEARCH_MAX_DEPTH: usize = 8;
const SEARCH_MAX_DIRS: usize = 50_000;

/// Breadth-first search below `root` for a directory named like a pod cgroup of
/// `uid`. Unreadable directories are skipped.
pub fn search_pod_dir(root: &Path, uid: &str) -> Option<PathBuf> {
    let mut queue = VecDeque::from([(root.to_path_buf(), 0usize)]);
    let mut visited = 0usize;
    while let Some((dir, depth)) = queue.pop_front() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            visited += 1;
            if visited > SEARCH_MAX_DIRS {
                return None;
            }
            let name = entry.file_name();
            if is_pod_dir_name(&name.to_string_lossy(), uid) {
                return Some(entry.path());
            }
            if depth + 1 < SEARCH_MAX_DEPTH {
                queue.push_back((entry.path(), depth + 1));
            }
        }
    }
    None
}

/// Number of normal components of a path (`/a/b` -> 2).
fn depth(path: &Path) -> u32 {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count() as u32
}

/// Facts about an existing cgroup directory `relative` under `mount`.
pub fn describe(
    mount: &Cgroup2Mount,
    relative: &Path,
    found_by: CgroupFoundBy,
) -> io::Result<PodCgroupInfo> {
    let path = mount.mount_point.join(relative);
    let meta = fs::metadata(&path)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            path.display().to_string(),
        ));
    }
    Ok(PodCgroupInfo {
        relative: Path::new("/").join(relative),
        id: meta.ino(),
        level: depth(&mount.root) + depth(relative),
        path,
        found_by,
    })
}

/// Finds the pod cgroup of `uid`: the kubelet candidates first, then the walk.
/// Returns what was tried when nothing is found.
pub fn locate_pod_cgroup(
    mount: &Cgroup2Mount,
    kubelet_roots: &[String],
    qos: Option<QosClass>,
    uid: &str,
) -> Result<PodCgroupInfo, Vec<PathBuf>> {
    let mut tried = Vec::new();
    for (relative, found_by) in candidate_paths(kubelet_roots, qos, uid) {
        if let Ok(info) = describe(mount, &relative, found_by) {
            return Ok(info);
        }
        tried.push(mount.mount_point.join(relative));
    }
    if let Some(found) = search_pod_dir(&mount.mount_point, uid)
        && let Ok(relative) = found.strip_prefix(&mount.mount_point)
        && let Ok(info) = describe(mount, relative, CgroupFoundBy::Search)
    {
        return Ok(info);
    }
    tried.push(mount.mount_point.join("**"));
    Err(tried)
}

/// Pids in `dir` and every cgroup below it (containers are child cgroups of the
/// pod cgroup, which itself holds no process). Pids are in the reader's pid
/// namespace.
pub fn pids_below(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc";

    fn s(p: &Path) -> String {
        p.display().to_string()
    }

    #[test]
    fn systemd_burstable_path_escapes_dashes_in_the_uid() {
        let name = pod_cgroup_name("/", QosClass::Burstable, UID);
        assert_eq!(
            s(&systemd_path(&name)),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_aaaa_bbbb_cccc_123456789abc.slice"
        );
    }

    #[test]
    fn systemd_besteffort_and_guaranteed_paths() {
        let be = pod_cgroup_name("/", QosClass::BestEffort, "u-1");
        assert_eq!(
            s(&systemd_path(&be)),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu_1.slice"
        );
        let g = pod_cgroup_name("/", QosClass::Guaranteed, "u-1");
        assert_eq!(s(&systemd_path(&g)), "kubepods.slice/kubepods-podu_1.slice");
    }

    #[test]
    fn cgroupfs_paths_keep_the_uid_as_is_and_skip_qos_for_guaranteed() {
        assert_eq!(
            s(&cgroupfs_path(&pod_cgroup_name(
                "/",
                QosClass::Burstable,
                UID
            ))),
            format!("kubepods/burstable/pod{UID}")
        );
        assert_eq!(
            s(&cgroupfs_path(&pod_cgroup_name(
                "",
                QosClass::BestEffort,
                UID
            ))),
            format!("kubepods/besteffort/pod{UID}")
        );
        assert_eq!(
            s(&cgroupfs_path(&pod_cgroup_name(
                "/",
                QosClass::Guaranteed,
                UID
            ))),
            format!("kubepods/pod{UID}")
        );
    }

    #[test]
    fn kubelet_cgroup_root_prefixes_nest_as_slices_under_systemd() {
        let name = pod_cgroup_name("/kube", QosClass::Burstable, "u");
        assert_eq!(
            s(&systemd_path(&name)),
            "kube.slice/kube-kubepods.slice/kube-kubepods-burstable.slice/kube-kubepods-burstable-podu.slice"
        );
        assert_eq!(s(&cgroupfs_path(&name)), "kube/kubepods/burstable/podu");
    }

    #[test]
    fn systemd_form_of_a_kubelet_root_means_the_same_components() {
        assert_eq!(
            kubelet_root_components("/kube.slice/kube-node_a.slice"),
            vec!["kube", "node-a"]
        );
        assert_eq!(
            kubelet_root_components("/kube/node-a"),
            vec!["kube", "node-a"]
        );
        assert!(kubelet_root_components("/").is_empty());
    }

    #[test]
    fn candidates_cover_both_drivers_and_every_class_when_qos_is_unknown() {
        let c = candidate_paths(&[], None, "u");
        assert_eq!(c.len(), 6);
        let paths: Vec<String> = c.iter().map(|(p, _)| s(p)).collect();
        assert!(paths.contains(&"kubepods.slice/kubepods-podu.slice".to_owned()));
        assert!(paths.contains(&"kubepods/besteffort/podu".to_owned()));
        let with_roots = candidate_paths(
            &["/".into(), "/kube".into()],
            Some(QosClass::Guaranteed),
            "u",
        );
        assert_eq!(with_roots.len(), 4);
        assert_eq!(
            s(&with_roots[2].0),
            "kube.slice/kube-kubepods.slice/kube-kubepods-podu.slice"
        );
    }

    #[test]
    fn qos_classes_parse_from_the_api_spelling_only() {
        assert_eq!(QosClass::from_api("BestEffort"), Some(QosClass::BestEffort));
        assert_eq!(QosClass::from_api("Guaranteed"), Some(QosClass::Guaranteed));
        assert_eq!(QosClass::from_api("Burstable"), Some(QosClass::Burstable));
        assert_eq!(QosClass::from_api("besteffort"), None);
    }

    #[test]
    fn mountinfo_parsing_finds_the_hybrid_unified_mount_and_its_root() {
        let text = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,name=systemd
";
        let m = parse_cgroup2_mount(text).expect("cgroup2 line");
        assert_eq!(m.mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m.root, PathBuf::from("/"));
        let nested = "40 1 0:29 /kubelet.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(nested).map(|m| m.root),
            Some(PathBuf::from("/kubelet.slice"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
    }

    /// A temp directory standing in for the cgroup2 mount (plain directories:
    /// the path logic does not care).
    struct TempTree(PathBuf);

    impl TempTree {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("rf-discovery-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).expect("temp dir");
            TempTree(p)
        }
        fn mount(&self) -> Cgroup2Mount {
            Cgroup2Mount {
                mount_point: self.0.clone(),
                root: PathBuf::from("/"),
            }
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn locating_in_a_tree_picks_the_existing_layout_for_every_class_and_driver() {
        for (i, class) in QosClass::ALL.into_iter().enumerate() {
            for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
                let tree = TempTree::new(&format!("layout{i}{driver:?}"));
                let name = pod_cgroup_name("/", class, UID);
                let rel = match driver {
                    CgroupDriver::Systemd => systemd_path(&name),
                    CgroupDriver::Cgroupfs => cgroupfs_path(&name),
                };
                fs::create_dir_all(tree.0.join(&rel).join("ctr")).expect("mkdir");
                let info = locate_pod_cgroup(&tree.mount(), &[], Some(class), UID).expect("found");
                assert_eq!(info.path, tree.0.join(&rel));
                assert_eq!(
                    info.id,
                    fs::metadata(tree.0.join(&rel)).expect("stat").ino()
                );
                assert_eq!(info.level, depth(&rel));
                assert_eq!(
                    info.found_by,
                    CgroupFoundBy::KubeletLayout {
                        driver,
                        kubelet_root: "/".into()
                    }
                );
                // Unknown QoS still finds it.
                assert_eq!(
                    locate_pod_cgroup(&tree.mount(), &[], None, UID)
                        .expect("found")
                        .path,
                    info.path
                );
            }
        }
    }

    #[test]
    fn a_pod_under_an_unknown_prefix_is_found_by_the_search() {
        let tree = TempTree::new("search");
        let rel =
            PathBuf::from("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice")
                .join(format!(
                    "kubelet-kubepods-besteffort-pod{}.slice",
                    UID.replace('-', "_")
                ));
        fs::create_dir_all(tree.0.join(&rel)).expect("mkdir");
        let info =
            locate_pod_cgroup(&tree.mount(), &[], Some(QosClass::BestEffort), UID).expect("found");
        assert_eq!(info.found_by, CgroupFoundBy::Search);
        assert_eq!(info.level, 4);
        assert_eq!(info.relative, Path::new("/").join(&rel));
    }

    #[test]
    fn a_missing_pod_cgroup_reports_every_path_tried() {
        let tree = TempTree::new("missing");
        fs::create_dir_all(tree.0.join("kubepods.slice")).expect("mkdir");
        let tried = locate_pod_cgroup(&tree.mount(), &[], Some(QosClass::Burstable), UID)
            .expect_err("absent");
        assert_eq!(tried.len(), 3, "{tried:?}");
        assert!(tried[0].ends_with(format!(
            "kubepods-burstable-pod{}.slice",
            UID.replace('-', "_")
        )));
    }

    #[test]
    fn the_level_counts_the_mount_root_too() {
        let tree = TempTree::new("level");
        fs::create_dir_all(tree.0.join("kubepods/podu")).expect("mkdir");
        let mount = Cgroup2Mount {
            mount_point: tree.0.clone(),
            root: PathBuf::from("/kubelet.slice"),
        };
        let info = locate_pod_cgroup(&mount, &[], Some(QosClass::Guaranteed), "u").expect("found");
        assert_eq!(info.level, 3);
    }

    #[test]
    fn pids_are_collected_from_the_pod_and_all_container_cgroups() {
        let tree = TempTree::new("pids");
        fs::create_dir_all(tree.0.join("pod/c1")).expect("mkdir");
        fs::create_dir_all(tree.0.join("pod/c2")).expect("mkdir");
        fs::write(tree.0.join("pod/cgroup.procs"), "").expect("write");
        fs::write(tree.0.join("pod/c1/cgroup.procs"), "10\n11\n").expect("write");
        fs::write(tree.0.join("pod/c2/cgroup.procs"), "12\n").expect("write");
        let mut pids = pids_below(&tree.0.join("pod"));
        pids.sort_unstable();
        assert_eq!(pids, vec![10, 11, 12]);
    }

    #[test]
    fn pod_cgroup_roots_are_the_kubepods_trees_that_exist() {
        let tree = TempTree::new("roots");
        fs::create_dir_all(tree.0.join("kubepods.slice/kubepods-burstable.slice")).expect("mkdir");
        let nested = tree.0.join("kubelet.slice/kubepods/besteffort/podu");
        fs::create_dir_all(&nested).expect("mkdir");
        let found: Vec<PathBuf> = pod_cgroup_roots(&tree.mount(), &["/".into()], &[nested])
            .into_iter()
            .map(|(path, id)| {
                assert_eq!(id, fs::metadata(&path).expect("stat").ino());
                path
            })
            .collect();
        assert_eq!(
            found,
            vec![
                tree.0.join("kubelet.slice/kubepods"),
                tree.0.join("kubepods.slice"),
            ]
        );
    }

    const HYBRID: &str = "\
33 25 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,xattr,release_agent=/x,name=systemd
36 33 0:31 / /sys/fs/cgroup/cpu,cpuacct rw shared:12 - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn v1_hierarchies_are_parsed_with_their_controllers_and_cgroup2_is_not_one() {
        let v1 = parse_cgroup_v1_mounts(HYBRID);
        assert_eq!(
            v1,
            vec![
                CgroupV1Mount {
                    mount_point: PathBuf::from("/sys/fs/cgroup/systemd"),
                    controllers: vec!["xattr".into(), "name=systemd".into()],
                },
                CgroupV1Mount {
                    mount_point: PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                    controllers: vec!["cpu".into(), "cpuacct".into()],
                },
            ]
        );
        let pure = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert!(parse_cgroup_v1_mounts(pure).is_empty());
    }

    /// A cgroup2 stand-in and a v1 hierarchy stand-in side by side.
    fn hybrid_trees(tag: &str) -> (TempTree, TempTree, Vec<CgroupV1Mount>) {
        let v2 = TempTree::new(&format!("{tag}-v2"));
        let v1 = TempTree::new(&format!("{tag}-v1"));
        let mounts = vec![CgroupV1Mount {
            mount_point: v1.0.clone(),
            controllers: vec!["pids".into()],
        }];
        (v2, v1, mounts)
    }

    #[test]
    fn cgroupfs_pods_in_v1_only_are_a_layout_problem_that_names_both_places() {
        let (v2, v1, mounts) = hybrid_trees("v1only");
        let pod = v1.0.join(format!("kubepods/burstable/pod{UID}"));
        fs::create_dir_all(pod.join("crio-abc")).expect("mkdir");
        let problem = layout_problem(&v2.mount(), &mounts, &["/".into()]).expect("a problem");
        assert_eq!(
            problem,
            LayoutProblem::PodsInV1Only {
                v1_roots: vec![v1.0.join("kubepods")],
                cgroup2: v2.0.clone(),
            }
        );
        let text = problem.to_string();
        assert!(
            text.contains("cgroupfs cgroup driver on a hybrid host"),
            "{text}"
        );
        assert!(
            text.contains(&v1.0.join("kubepods").display().to_string()),
            "{text}"
        );
        assert!(
            text.contains("hostNetwork pods cannot be told from the node"),
            "{text}"
        );
        // The pod itself: found in v1, by the same layouts as in v2.
        assert_eq!(
            v1_pod_cgroup(&mounts, &[], Some(QosClass::Burstable), UID),
            Some(pod.clone())
        );
        assert_eq!(v1_pod_cgroup(&mounts, &[], None, UID), Some(pod));
        assert_eq!(v1_pod_cgroup(&mounts, &[], None, "another-uid"), None);
    }

    #[test]
    fn pods_in_cgroup2_too_are_no_layout_problem() {
        // The systemd driver on a hybrid host: the slices in v1 and in v2.
        let (v2, v1, mounts) = hybrid_trees("both");
        fs::create_dir_all(v1.0.join("kubepods.slice")).expect("mkdir");
        fs::create_dir_all(v2.0.join("kubepods.slice")).expect("mkdir");
        assert_eq!(layout_problem(&v2.mount(), &mounts, &[]), None);
        // No kubelet at all yet: nothing to say either.
        let (v2, _v1, mounts) = hybrid_trees("none");
        assert_eq!(layout_problem(&v2.mount(), &mounts, &[]), None);
        // A kubelet root is looked for in v1 as in v2.
        let (v2, v1, mounts) = hybrid_trees("rooted");
        fs::create_dir_all(v1.0.join("kube/kubepods/besteffort")).expect("mkdir");
        assert_eq!(layout_problem(&v2.mount(), &mounts, &["/".into()]), None);
        assert!(layout_problem(&v2.mount(), &mounts, &["/kube".into()]).is_some());
    }

    #[test]
    fn crio_and_containerd_container_cgroups_leave_the_pod_cgroup_where_the_kubelet_put_it() {
        let names = [
            ("crio-1a2b.scope", "crio-conmon-1a2b.scope"),
            ("crio-1a2b", "crio-conmon-1a2b"),
            ("cri-containerd-1a2b.scope", "cri-containerd-3c4d.scope"),
        ];
        for (i, (container, sibling)) in names.into_iter().enumerate() {
            for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
                let tree = TempTree::new(&format!("runtime{i}{driver:?}"));
                let name = pod_cgroup_name("/", QosClass::Burstable, UID);
                let rel = match driver {
                    CgroupDriver::Systemd => systemd_path(&name),
                    CgroupDriver::Cgroupfs => cgroupfs_path(&name),
                };
                for (dir, pid) in [(container, "10"), (sibling, "11")] {
                    fs::create_dir_all(tree.0.join(&rel).join(dir)).expect("mkdir");
                    fs::write(tree.0.join(&rel).join(dir).join("cgroup.procs"), pid)
                        .expect("write");
                }
                let info = locate_pod_cgroup(&tree.mount(), &[], None, UID).expect("found");
                assert_eq!(info.path, tree.0.join(&rel), "{container} {driver:?}");
                // Both children's processes: conmon's too (the caller tells them apart).
                let mut pids = pids_below(&info.path);
                pids.sort_unstable();
                assert_eq!(pids, vec![10, 11]);
                // A container cgroup is never taken for the pod's.
                assert!(!is_pod_dir_name(container, UID));
            }
        }
    }

    #[test]
    fn every_top_level_cgroup_is_listed_with_its_id_and_files_are_not() {
        let tree = TempTree::new("toplevel");
        fs::create_dir_all(tree.0.join("system.slice/kubelet.service")).expect("mkdir");
        fs::create_dir_all(tree.0.join("user.slice")).expect("mkdir");
        fs::write(tree.0.join("cgroup.procs"), "1\n").expect("write");
        let found = every_top_level_cgroup(&tree.mount());
        let paths: Vec<PathBuf> = found.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(
            paths,
            vec![tree.0.join("system.slice"), tree.0.join("user.slice")]
        );
        for (path, id) in found {
            assert_eq!(id, fs::metadata(path).expect("stat").ino());
        }
    }
}
