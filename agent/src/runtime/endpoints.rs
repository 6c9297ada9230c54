//! Endpoint lifecycle: every local pod the engine lists is located in the kernel (on
//! a blocking thread), attached (TC on its host veth, else cgroup_skb on its cgroup)
//! and detached when the engine no longer lists it. Pods not found yet (Pending, veth
//! not created) stay pending and are looked for again on link events and on a timer.
//! A pod attached on its cgroup because its veth did not exist yet (the kubelet
//! creates the cgroup first) gets TC as well when a link event shows the veth: the
//! cgroup hook does not see what the kernel answers for the pod (pings, resets).
//!
//! A sandbox can go before its Pod object does (the kubelet removes the veth and the
//! cgroup, then reports, then the object is deleted), and its IP can be handed to a
//! new pod meanwhile. So every pass checks that each attached pod's host veth (or,
//! hooked on its cgroup, its pod cgroup) still exists; when it is gone the pod is
//! detached, pending again, and the engine is told ([`crate::policy::Engine::set_sandbox_gone`])
//! so its address stops carrying its identity at once. It counts as back only when a
//! new sandbox of that very pod is found (`is_new_sandbox`: a new veth in its own
//! processes' namespace, or its cgroup back with processes), never by its IP alone,
//! which may lead to the pod that got the address.
//!
//! Must not: detach anything it cannot account for while a wanted pod is still
//! unlocated (a leftover link from a previous run may be that pod's only
//! protection), nor decide policy.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::datapath::{Datapath, DatapathError, Interface};
use crate::discovery::{Hook, Location, Locator, PodRef, SandboxMark};
use crate::operator::health::Health;
use crate::operator::metrics::Stage;
use crate::policy::Engine;
use crate::tables::EndpointId;

/// A pod the engine wants enforced.
#[derive(Clone, Debug)]
pub struct Desired {
    pub id: EndpointId,
    pub pod: PodRef,
}

/// Pods and what locating them found.
pub type Located = Vec<(Desired, Result<Location, crate::discovery::DiscoveryError>)>;

/// Where an endpoint stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointState {
    /// Attached on a host veth.
    Tc { ifindex: u32, interface: String },
    /// Attached on the pod cgroup.
    Cgroup { cgroup_id: u64 },
    /// Not enforced: host networking.
    NotEnforced { reason: String },
    /// Not found in the kernel yet.
    Pending { since: Instant, last_error: String },
}

impl EndpointState {
    /// Its hook and state, as `rayfence_endpoints` counts them.
    fn hook_and_state(&self) -> (&'static str, &'static str) {
        match self {
            Self::Tc { .. } => ("tc", "attached"),
            Self::Cgroup { .. } => ("cgroup", "attached"),
            Self::NotEnforced { .. } => ("none", "not-enforced"),
            Self::Pending { .. } => ("none", "pending"),
        }
    }
}

/// How long after a cgroup attach the retry timer keeps looking for the pod's host
/// veth. The kubelet creates the pod cgroup, then the sandbox network, then the
/// containers: the veth follows within the sandbox start. After that only link events
/// look (a pod on macvlan or ipvlan never has one).
const TC_UPGRADE_WINDOW: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Endpoints {
    states: BTreeMap<EndpointId, (String, EndpointState)>,
    /// Cgroup-attached pods, and when: candidates for TC while in the window.
    cgroup_since: BTreeMap<EndpointId, Instant>,
    /// What each attached pod's sandbox is known by.
    marks: BTreeMap<EndpointId, SandboxMark>,
    /// Pods whose sandbox was seen gone, with their UID and what went: their address
    /// carries no identity until a new sandbox of that same pod is found.
    gone: BTreeMap<EndpointId, (String, SandboxMark)>,
}

impl Endpoints {
    /// Where one endpoint stands, if the runtime has tried it.
    pub fn state(&self, id: EndpointId) -> Option<&EndpointState> {
        self.states.get(&id).map(|(_, state)| state)
    }

    pub fn has_pending(&self) -> bool {
        self.states
            .values()
            .any(|(_, s)| matches!(s, EndpointState::Pending { .. }))
    }

    /// Pods still to find, cgroup-attached pods whose veth may yet appear, or pods
    /// hooked on their cgroup at all (no event says when a cgroup goes, so their
    /// sandboxes are checked on the timer): the runtime keeps syncing on its timer
    /// while this holds.
    pub fn needs_attention(&self) -> bool {
        self.has_pending()
            || self
                .cgroup_since
                .values()
                .any(|since| since.elapsed() < TC_UPGRADE_WINDOW)
            || self
                .marks
                .values()
                .any(|m| matches!(m, SandboxMark::Cgroup(_)))
    }

    /// Attached pods whose sandbox has disappeared (on a blocking thread).
    async fn vanished(&self, locator: &Arc<Locator>, health: &Health) -> Vec<EndpointId> {
        if self.marks.is_empty() {
            return Vec::new();
        }
        let (ids, marks): (Vec<EndpointId>, Vec<SandboxMark>) =
            self.marks.iter().map(|(id, m)| (*id, m.clone())).unzip();
        let locator = locator.clone();
        match tokio::task::spawn_blocking(move || locator.sandboxes_gone(&marks)).await {
            Ok(gone) => ids
                .into_iter()
                .zip(gone)
                .filter_map(|(id, gone)| gone.then_some(id))
                .collect(),
            Err(error) => {
                health.metrics.failed(Stage::Locate);
                tracing::error!(%error, "the sandbox check failed");
                Vec::new()
            }
        }
    }

    /// The sandbox of `d` is gone: detach it, make it pending, and take its
    /// address's trust away. Whether the engine changed.
    fn sandbox_gone(
        &mut self,
        d: &Desired,
        engine: &mut Engine,
        datapath: &mut Datapath,
        health: &Health,
    ) -> bool {
        let pod = format!("{}/{}", d.pod.namespace, d.pod.name);
        let mark = self.marks.remove(&d.id);
        self.cgroup_since.remove(&d.id);
        detach(datapath, d.id, &pod, health);
        let Some(mark) = mark else {
            return false;
        };
        let what = match &mark {
            SandboxMark::Interface { name, .. } => format!("host veth {name}"),
            SandboxMark::Cgroup(path) => format!("cgroup {}", path.display()),
        };
        tracing::warn!(
            pod = %pod, endpoint = d.id, gone = %what, ips = %crate::logging::list(&d.pod.ips),
            "the pod's sandbox is gone while its Pod object remains: its addresses no longer carry its identity"
        );
        self.states.insert(
            d.id,
            (
                pod,
                EndpointState::Pending {
                    since: Instant::now(),
                    last_error: format!("its sandbox is gone ({what} removed)"),
                },
            ),
        );
        self.gone.insert(d.id, (d.pod.uid.clone(), mark));
        engine.set_sandbox_gone(&d.pod.namespace, &d.pod.name, &d.pod.uid, true)
    }

    /// Attached, or known not to need a hook.
    fn is_settled(&self, id: EndpointId) -> bool {
        matches!(
            self.states.get(&id),
            Some((
                _,
                EndpointState::Tc { .. }
                    | EndpointState::Cgroup { .. }
                    | EndpointState::NotEnforced { .. }
            ))
        )
    }

    /// Attached on its cgroup only, and its host veth may still appear: after a link
    /// event, or within [`TC_UPGRADE_WINDOW`] of the attach. Both hooks then run,
    /// with one endpoint id, so they share conntrack and agree.
    fn may_gain_tc(&self, id: EndpointId, after_link_event: bool) -> bool {
        self.cgroup_since
            .get(&id)
            .is_some_and(|since| after_link_event || since.elapsed() < TC_UPGRADE_WINDOW)
    }

    /// Whether a pass should (re)locate this pod: not attached yet, or a candidate
    /// for TC.
    fn wants_locating(&self, id: EndpointId, after_link_event: bool) -> bool {
        !self.is_settled(id) || self.may_gain_tc(id, after_link_event)
    }

    /// Locates (on a blocking thread) the wanted pods not attached yet, and the
    /// cgroup-attached ones that may gain TC.
    pub async fn locate(
        &self,
        desired: &[Desired],
        locator: &Arc<Locator>,
        health: &Health,
        after_link_event: bool,
    ) -> Located {
        let to_locate: Vec<Desired> = desired
            .iter()
            .filter(|d| self.wants_locating(d.id, after_link_event))
            .cloned()
            .collect();
        if to_locate.is_empty() {
            return Vec::new();
        }
        let locator = locator.clone();
        let located = tokio::task::spawn_blocking(move || {
            to_locate
                .into_iter()
                .map(|d| {
                    let found = locator.locate(&d.pod);
                    (d, found)
                })
                .collect::<Vec<_>>()
        })
        .await;
        match located {
            Ok(located) => located,
            Err(error) => {
                health.metrics.failed(Stage::Locate);
                tracing::error!(%error, "the locate task failed");
                Vec::new()
            }
        }
    }

    /// Converges attachments to `desired`. `link_at`: when the link event that
    /// triggered this pass was seen (for the attach latency). `prelocated`: what
    /// [`Self::locate`] found just before (the first programming locates before it
    /// applies, so re-registering adopted endpoints follows the apply at once).
    /// Tells `engine` which sandboxes went or came back; whether that changed it
    /// (the caller then programs the datapath again).
    #[expect(clippy::too_many_arguments, reason = "the runtime's parts it works on")]
    pub async fn sync(
        &mut self,
        desired: Vec<Desired>,
        engine: &mut Engine,
        datapath: &mut Datapath,
        locator: &Arc<Locator>,
        health: &Health,
        link_at: Option<Instant>,
        prelocated: Option<Located>,
    ) -> bool {
        let wanted: BTreeSet<EndpointId> = desired.iter().map(|d| d.id).collect();
        let mut engine_changed = false;
        // A gone sandbox is remembered for that pod only (same name, new UID: a new pod).
        self.gone
            .retain(|id, (uid, _)| desired.iter().any(|d| d.id == *id && d.pod.uid == *uid));
        self.marks.retain(|id, _| wanted.contains(id));

        // Sandboxes that went away: before anything else, so no pass leaves the
        // address trusted.
        let vanished = self.vanished(locator, health).await;
        for d in desired.iter().filter(|d| vanished.contains(&d.id)) {
            engine_changed |= self.sandbox_gone(d, engine, datapath, health);
        }

        // Gone from the engine: detach.
        let gone: Vec<EndpointId> = self
            .states
            .keys()
            .filter(|id| !wanted.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.cgroup_since.remove(&id);
            self.marks.remove(&id);
            if let Some((pod, state)) = self.states.remove(&id) {
                detach(datapath, id, &pod, health);
                let (hook, was) = state.hook_and_state();
                tracing::info!(pod = %pod, endpoint = id, hook = %hook, was = %was, "endpoint removed");
            }
        }

        // Not attached yet: locate on a blocking thread (unless the caller already
        // did), then attach here.
        let after_link_event = link_at.is_some();
        let located = match prelocated {
            Some(located) => located,
            None => {
                self.locate(&desired, locator, health, after_link_event)
                    .await
            }
        };
        for (d, found) in located {
            if !wanted.contains(&d.id) || vanished.contains(&d.id) {
                continue;
            }
            if let Some((_, went)) = self.gone.get(&d.id) {
                match found {
                    Ok(location) if is_new_sandbox(went, &location) => {
                        self.attach(datapath, d.clone(), Ok(location), health, link_at);
                        if self.is_settled(d.id) {
                            self.gone.remove(&d.id);
                            tracing::info!(pod = %format!("{}/{}", d.pod.namespace, d.pod.name),
                                endpoint = d.id, "a new sandbox of the pod is up: its addresses are its own again");
                            engine_changed |= engine.set_sandbox_gone(
                                &d.pod.namespace,
                                &d.pod.name,
                                &d.pod.uid,
                                false,
                            );
                        }
                    }
                    _ => {
                        if let Some((_, EndpointState::Pending { last_error, .. })) =
                            self.states.get_mut(&d.id)
                        {
                            "its sandbox is gone; no new sandbox of this pod yet"
                                .clone_into(last_error);
                        }
                    }
                }
                continue;
            }
            if self.may_gain_tc(d.id, after_link_event) {
                self.add_tc(datapath, &d, found.ok(), health);
            } else if !self.is_settled(d.id) {
                self.attach(datapath, d, found, health, link_at);
            }
        }

        // Leftovers of a previous run (adopted from pinned state) that no wanted pod
        // accounts for, once every wanted pod is located.
        if !self.has_pending() {
            let ours: BTreeSet<EndpointId> = self.states.keys().copied().collect();
            let leftovers: Vec<EndpointId> = datapath
                .attachments()
                .keys()
                .filter(|id| !ours.contains(id))
                .copied()
                .collect();
            for id in leftovers {
                detach(datapath, id, "(previous run)", health);
                tracing::info!(endpoint = id, "detached an endpoint left by a previous run");
            }
        }

        let mut counts: BTreeMap<(&'static str, &'static str), usize> = BTreeMap::new();
        for labels in [
            ("tc", "attached"),
            ("cgroup", "attached"),
            ("none", "not-enforced"),
            ("none", "pending"),
        ] {
            counts.insert(labels, 0);
        }
        for (_, state) in self.states.values() {
            *counts.entry(state.hook_and_state()).or_default() += 1;
        }
        for ((hook, state), n) in counts {
            health.metrics.endpoints_in_state(hook, state, n);
        }
        engine_changed
    }

    /// A cgroup-attached pod whose host veth has appeared gets TC too; anything else
    /// (still no veth, a failed attach) leaves it on its cgroup, enforced.
    fn add_tc(
        &mut self,
        datapath: &mut Datapath,
        d: &Desired,
        found: Option<Location>,
        health: &Health,
    ) {
        let Some(interface) = found
            .filter(|l| l.hook == Hook::Tc)
            .and_then(|l| l.host_interface)
        else {
            return;
        };
        let pod = format!("{}/{}", d.pod.namespace, d.pod.name);
        match datapath.attach_tc(d.id, Interface::Index(interface.ifindex)) {
            Ok(ifindex) => {
                self.cgroup_since.remove(&d.id);
                self.marks.insert(
                    d.id,
                    SandboxMark::Interface {
                        ifindex,
                        name: interface.name.clone(),
                    },
                );
                tracing::info!(
                    pod = %pod, endpoint = d.id, hook = "tc", interface = %interface.name, ifindex,
                    "host veth appeared: TC attached beside the cgroup hook"
                );
                self.states.insert(
                    d.id,
                    (
                        pod,
                        EndpointState::Tc {
                            ifindex,
                            interface: interface.name,
                        },
                    ),
                );
            }
            Err(error) => {
                health.metrics.failed(Stage::Attach);
                tracing::warn!(pod = %pod, endpoint = d.id, %error, "adding TC failed; the cgroup hook stays");
            }
        }
    }

    fn attach(
        &mut self,
        datapath: &mut Datapath,
        d: Desired,
        found: Result<Location, crate::discovery::DiscoveryError>,
        health: &Health,
        link_at: Option<Instant>,
    ) {
        let pod = format!("{}/{}", d.pod.namespace, d.pod.name);
        let pending_since = match self.states.get(&d.id) {
            Some((_, EndpointState::Pending { since, .. })) => Some(*since),
            _ => None,
        };
        let location = match found {
            Ok(l) => l,
            Err(error) => {
                let first = pending_since.is_none();
                if first {
                    tracing::info!(pod = %pod, endpoint = d.id, reason = %error, "pod not found in the kernel yet; pending");
                }
                self.states.insert(
                    d.id,
                    (
                        pod,
                        EndpointState::Pending {
                            since: pending_since.unwrap_or_else(Instant::now),
                            last_error: error.to_string(),
                        },
                    ),
                );
                return;
            }
        };
        let previously: Option<crate::datapath::Attachments> =
            datapath.attachments().get(&d.id).cloned();
        let result: Result<EndpointState, DatapathError> =
            match (&location.hook, &location.host_interface, &location.cgroup) {
                (Hook::Tc, Some(interface), _) => datapath
                    .attach_tc(d.id, Interface::Index(interface.ifindex))
                    .map(|ifindex| EndpointState::Tc {
                        ifindex,
                        interface: interface.name.clone(),
                    }),
                (Hook::Cgroup, _, Some(cgroup)) | (Hook::Tc, None, Some(cgroup)) => datapath
                    .attach_cgroup(d.id, &cgroup.path)
                    .map(|cgroup_id| EndpointState::Cgroup { cgroup_id }),
                (Hook::None(reason), _, _) => Ok(EndpointState::NotEnforced {
                    reason: format!("{reason:?}"),
                }),
                _ => Ok(EndpointState::Pending {
                    since: pending_since.unwrap_or_else(Instant::now),
                    last_error: "located without an interface or cgroup".into(),
                }),
            };
        match result {
            Ok(state) => {
                let adopted = match (&state, &previously) {
                    (EndpointState::Tc { ifindex, .. }, Some(p)) => p.ifindexes.contains(ifindex),
                    (EndpointState::Cgroup { cgroup_id }, Some(p)) => p.cgroups.contains(cgroup_id),
                    _ => false,
                };
                let since = link_at.or(pending_since);
                let latency_ms = since.map(|s| s.elapsed().as_secs_f64() * 1e3);
                if let (Some(ms), EndpointState::Tc { .. } | EndpointState::Cgroup { .. }) =
                    (latency_ms, &state)
                {
                    health.metrics.pod_attached(ms / 1e3);
                }
                match &state {
                    EndpointState::Tc { ifindex, interface } => tracing::info!(
                        pod = %pod, endpoint = d.id, hook = "tc", interface = %interface, ifindex = *ifindex,
                        via = location.host_interface.as_ref().map(|h| tracing::field::display(h.via)), adopted, latency_ms,
                        "endpoint attached"
                    ),
                    EndpointState::Cgroup { cgroup_id } => tracing::warn!(
                        pod = %pod, endpoint = d.id, hook = "cgroup", cgroup_id = *cgroup_id,
                        cgroup = location.cgroup.as_ref().map(|c| tracing::field::display(c.path.display())), adopted, latency_ms,
                        "endpoint attached on its cgroup: in the pod's own network namespace the \
                         node's addresses cannot be told from traffic the node forwards, so they \
                         are ordinary addresses for this pod (only an ipBlock allows them, kubelet \
                         probes included)"
                    ),
                    EndpointState::NotEnforced { reason } => tracing::info!(
                        pod = %pod, endpoint = d.id, hook = "none", reason = %reason,
                        "endpoint not enforced (host networking)"
                    ),
                    EndpointState::Pending { .. } => {}
                }
                if matches!(state, EndpointState::Cgroup { .. }) {
                    self.cgroup_since.insert(d.id, Instant::now());
                }
                let mark = match (&state, &location.cgroup) {
                    (EndpointState::Tc { ifindex, interface }, _) => Some(SandboxMark::Interface {
                        ifindex: *ifindex,
                        name: interface.clone(),
                    }),
                    (EndpointState::Cgroup { .. }, Some(cgroup)) => {
                        Some(SandboxMark::Cgroup(cgroup.path.clone()))
                    }
                    _ => None,
                };
                match mark {
                    Some(mark) => self.marks.insert(d.id, mark),
                    None => self.marks.remove(&d.id),
                };
                self.states.insert(d.id, (pod, state));
            }
            Err(error) => {
                health.metrics.failed(Stage::Attach);
                tracing::error!(pod = %pod, endpoint = d.id, %error, "attaching failed; retrying");
                self.states.insert(
                    d.id,
                    (
                        pod,
                        EndpointState::Pending {
                            since: pending_since.unwrap_or_else(Instant::now),
                            last_error: error.to_string(),
                        },
                    ),
                );
            }
        }
    }
}

/// Whether `location` is a new sandbox of the pod whose sandbox part `went` is
/// gone. Never by its IP alone (the route or bridge methods): the address may be the
/// pod's that got it next. For a pod on a veth: a different veth, found through the
/// network namespace of the pod's own processes (during teardown the old sandbox's
/// processes outlive its veth, in a namespace with none). For a pod hooked on its
/// cgroup: its pod cgroup back, with processes.
fn is_new_sandbox(went: &SandboxMark, location: &Location) -> bool {
    match went {
        SandboxMark::Interface { ifindex, .. } => {
            location.hook == Hook::Tc
                && location.host_interface.as_ref().is_some_and(|i| {
                    i.via == crate::discovery::HowFound::PodNetns && i.ifindex != *ifindex
                })
        }
        SandboxMark::Cgroup(_) => location.hook == Hook::Cgroup && location.running,
    }
}

fn detach(datapath: &mut Datapath, id: EndpointId, pod: &str, health: &Health) {
    match datapath.detach(id) {
        Ok(()) | Err(DatapathError::NotAttached { .. }) => {}
        Err(error) => {
            health.metrics.failed(Stage::Detach);
            tracing::error!(pod = %pod, endpoint = id, %error, "detaching failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::discovery::{CgroupFoundBy, HostInterface, HowFound, PodCgroupInfo};

    fn location(hook: Hook, interface: Option<(u32, HowFound)>, running: bool) -> Location {
        Location {
            cgroup: Some(PodCgroupInfo {
                path: PathBuf::from("/sys/fs/cgroup/kubepods/podu1"),
                relative: PathBuf::from("/kubepods/podu1"),
                id: 7,
                level: 2,
                found_by: CgroupFoundBy::Search,
            }),
            host_interface: interface.map(|(ifindex, via)| HostInterface {
                ifindex,
                name: format!("veth{ifindex}"),
                via,
            }),
            hook,
            running,
            misses: Vec::new(),
        }
    }

    #[test]
    fn a_gone_veth_comes_back_only_as_a_new_veth_of_the_pods_own_namespace() {
        let went = SandboxMark::Interface {
            ifindex: 6,
            name: "veth6".into(),
        };
        // The old sandbox's processes outlive its veth: cgroup only, not back.
        assert!(!is_new_sandbox(&went, &location(Hook::Cgroup, None, true)));
        // A veth found by the pod's IP may be the pod that got the address.
        for via in [HowFound::RouteToVeth, HowFound::BridgeFdb] {
            assert!(!is_new_sandbox(
                &went,
                &location(Hook::Tc, Some((8, via)), true)
            ));
        }
        // The same veth again is not a new sandbox.
        assert!(!is_new_sandbox(
            &went,
            &location(Hook::Tc, Some((6, HowFound::PodNetns)), true)
        ));
        assert!(is_new_sandbox(
            &went,
            &location(Hook::Tc, Some((8, HowFound::PodNetns)), true)
        ));
    }

    #[test]
    fn a_gone_pod_cgroup_comes_back_only_with_processes() {
        let went = SandboxMark::Cgroup(PathBuf::from("/sys/fs/cgroup/kubepods/podu1"));
        assert!(!is_new_sandbox(&went, &location(Hook::Cgroup, None, false)));
        assert!(is_new_sandbox(&went, &location(Hook::Cgroup, None, true)));
    }
}
