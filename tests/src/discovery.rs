//! What the discovery tests share: a fake kubelet cgroup tree under the cgroup2
//! mount, unique pod UIDs, and a locator pointed at a topology's node. Must not:
//! assert anything; the tests decide.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Result;
use rayfence::discovery::cgroup::{cgroupfs_path, pod_cgroup_name, systemd_path};
use rayfence::discovery::{CgroupDriver, HowFound, Locator, LocatorConfig, PodRef, QosClass};

use crate::{Node, Pod, TestCgroup};

static UIDS: AtomicU32 = AtomicU32::new(0);

/// A UID unique to this process and call, shaped like a Kubernetes one.
pub fn unique_uid() -> String {
    let n = UIDS.fetch_add(1, Ordering::Relaxed);
    format!("5e1f{n:04x}-aaaa-4bbb-8ccc-{:012x}", std::process::id())
}

/// A fake kubelet tree `<cgroup2 mount>/rf-cg-<pid>-<n>/<kubelet layout>/ctr`,
/// removed (with whatever runs in it) on drop. The root stands in for the
/// cgroup2 root: give [`KubeletTree::root`] to `LocatorConfig::cgroup_root`.
pub struct KubeletTree {
    // Field order is drop order: the leaves' guards go first, the root last
    // (the root's guard alone would do: it kills and removes the whole tree).
    pub container: TestCgroup,
    pub pod: TestCgroup,
    /// The kubelet's slices between the root and the pod (kubepods, the QoS
    /// class), outermost first.
    pub levels: Vec<TestCgroup>,
    pub root: TestCgroup,
    pub uid: String,
}

impl KubeletTree {
    pub fn new(driver: CgroupDriver, qos: QosClass) -> Result<Self> {
        Self::with_uid(driver, qos, unique_uid())
    }

    pub fn with_uid(driver: CgroupDriver, qos: QosClass, uid: String) -> Result<Self> {
        let root = TestCgroup::new()?;
        let name = pod_cgroup_name("/", qos, &uid);
        let rel = match driver {
            CgroupDriver::Systemd => systemd_path(&name),
            CgroupDriver::Cgroupfs => cgroupfs_path(&name),
        };
        let components: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let mut levels: Vec<TestCgroup> = Vec::new();
        for c in &components {
            let next = match levels.last() {
                Some(parent) => parent.child(c)?,
                None => root.child(c)?,
            };
            levels.push(next);
        }
        let pod = levels.pop().expect("a pod cgroup component");
        let container = pod.child("ctr")?;
        Ok(KubeletTree {
            container,
            pod,
            levels,
            root,
            uid,
        })
    }

    pub fn root(&self) -> PathBuf {
        self.root.path().to_owned()
    }

    /// Depth of the pod cgroup below the real cgroup2 root.
    pub fn pod_level(&self) -> u32 {
        let mount = crate::cgroup::cgroup2_mount().expect("cgroup2 mount");
        self.pod
            .path()
            .strip_prefix(mount)
            .expect("under the mount")
            .iter()
            .count() as u32
    }
}

/// A locator whose host namespace is `node`'s and whose cgroup2 root is `root`
/// (the agent's own view when `None`), trying only `methods`.
pub fn locator(node: &Node, root: Option<PathBuf>, methods: &[HowFound]) -> Result<Locator> {
    Ok(Locator::new(LocatorConfig {
        cgroup_root: root,
        host_netns: Some(node.netns.path()),
        methods: methods.to_vec(),
        ..LocatorConfig::default()
    })?)
}

/// The API's view of a topology pod.
pub fn pod_ref(pod: &Pod, uid: &str, qos: QosClass) -> PodRef {
    PodRef {
        namespace: "ray".into(),
        name: pod.name.clone(),
        uid: uid.to_owned(),
        qos_class: Some(qos),
        ips: pod.ips().to_vec(),
        host_network: false,
    }
}
