//! The agent's side of the CNI guard (see [`crate::datapath::guard`]): keeps
//! `RF_GUARDNS` equal to the namespaces to guard (those holding a RayCluster, and
//! those labelled `rayfence.io/guard: "true"`) and `RF_GUARDDNS` equal to the DNS
//! addresses a guarded pod may query (the DNS base flow's), and accounts for every guard the
//! plugin wrote: taken over (the endpoint lifecycle attached the pod: its own entry
//! replaced the guard in one write), pending (the agent has not programmed the pod
//! yet: counted in `rayfence_endpoints_guarded`, listed in `rayfence status`), or
//! released.
//!
//! Must not: release a guard for a pod it cannot account for. A guard is released
//! only once every kind has had its first full sync, and only when its veth is
//! gone, or its pod is known and not one the engine enforces, or its namespace is no
//! longer guarded and the pod is unknown. Before the first sync it writes nothing
//! (the pinned namespace list stays as the last agent left it).
use std::collections::{BTreeMap, BTreeSet};

use crate::datapath::Datapath;
use crate::datapath::guard::{Guard, waited_ms};
use crate::discovery::netlink::Rtnl;
use crate::operator::health::Health;
use crate::operator::metrics::Stage;
use crate::policy::Engine;

/// A pod the plugin holds that the agent has not programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingGuard {
    pub namespace: String,
    pub pod: String,
    pub ifindex: u32,
    /// How long it has been held, in milliseconds.
    pub waited_ms: u64,
}

#[derive(Default)]
pub struct Guards {
    /// What `RF_GUARDNS` was last set to by this agent.
    namespaces: Option<BTreeMap<String, u32>>,
    /// What `RF_GUARDDNS` was last set to: addresses, and port 53 anywhere.
    dns: Option<(BTreeSet<std::net::IpAddr>, bool)>,
    pending: Vec<PendingGuard>,
    /// Pods whose pending guard was logged already.
    logged: BTreeSet<(String, String)>,
}

impl Guards {
    pub fn pending(&self) -> &[PendingGuard] {
        &self.pending
    }

    /// The namespaces guarded now (as last written), with why.
    pub fn namespaces(&self) -> Option<&BTreeMap<String, u32>> {
        self.namespaces.as_ref()
    }

    /// Whether `namespace/pod` is held by a guard the agent has not taken over.
    pub fn is_pending(&self, namespace: &str, pod: &str) -> Option<&PendingGuard> {
        self.pending
            .iter()
            .find(|g| g.namespace == namespace && g.pod == pod)
    }

    /// One pass; `synced`: every kind had its first full sync.
    pub fn sync<V>(
        &mut self,
        engine: &Engine,
        known_pods: &BTreeMap<(String, String), V>,
        datapath: &mut Datapath,
        health: &Health,
        synced: bool,
    ) {
        for waited in datapath.take_guard_waits() {
            health.metrics.guard_taken_over(waited);
        }
        if synced {
            let wanted = engine.guarded_namespaces();
            if self.namespaces.as_ref() != Some(&wanted) {
                match datapath.set_guarded_namespaces(&wanted) {
                    Ok(()) => {
                        tracing::info!(namespaces = %crate::logging::list(wanted.keys()),
                            "namespaces whose new pods the CNI plugin guards");
                        self.namespaces = Some(wanted);
                    }
                    Err(error) => {
                        health.metrics.failed(Stage::Guard);
                        tracing::error!(%error, "writing the guarded namespaces failed; retrying");
                    }
                }
            }
        }
        if synced {
            let dns = engine.guard_dns();
            if self.dns.as_ref() != Some(&dns) {
                match datapath.set_guard_dns(&dns.0, dns.1) {
                    Ok(()) => {
                        tracing::info!(addresses = %crate::logging::list(&dns.0), anywhere = dns.1,
                            "DNS a pod under the CNI guard may query (port 53)");
                        self.dns = Some(dns);
                    }
                    Err(error) => {
                        health.metrics.failed(Stage::Guard);
                        tracing::error!(%error, "writing the guard's DNS addresses failed; retrying");
                    }
                }
            }
        }
        let guards = match datapath.guards() {
            Ok(guards) => guards,
            Err(error) => {
                health.metrics.failed(Stage::Guard);
                tracing::warn!(%error, "reading the CNI guards failed; retrying");
                return;
            }
        };
        let mut pending = Vec::new();
        for guard in guards {
            match self.verdict(&guard, engine, known_pods, synced) {
                Keep::Pending => pending.push(PendingGuard {
                    waited_ms: waited_ms(guard.since_unix_ms),
                    namespace: guard.namespace,
                    pod: guard.pod,
                    ifindex: guard.ifindex,
                }),
                Keep::Release(why) => match datapath.release_guard(guard.ifindex) {
                    Ok(()) => {
                        if why != "taken over" {
                            tracing::info!(pod = %format!("{}/{}", guard.namespace, guard.pod),
                                ifindex = guard.ifindex, reason = why, "released the CNI guard");
                        }
                    }
                    Err(error) => {
                        health.metrics.failed(Stage::Guard);
                        tracing::warn!(pod = %format!("{}/{}", guard.namespace, guard.pod),
                            %error, "releasing the CNI guard failed; retrying");
                    }
                },
            }
        }
        for guard in &pending {
            let key = (guard.namespace.clone(), guard.pod.clone());
            if self.logged.insert(key) {
                tracing::info!(pod = %format!("{}/{}", guard.namespace, guard.pod),
                    ifindex = guard.ifindex, waited_ms = guard.waited_ms,
                    "pod guarded by the CNI plugin, not programmed yet: only its node reaches it");
            }
        }
        self.logged
            .retain(|(ns, pod)| pending.iter().any(|g| &g.namespace == ns && &g.pod == pod));
        health.metrics.pods_guarded(pending.len());
        self.pending = pending;
    }

    fn verdict<V>(
        &self,
        guard: &Guard,
        engine: &Engine,
        known_pods: &BTreeMap<(String, String), V>,
        synced: bool,
    ) -> Keep {
        if !guard.holding {
            return Keep::Release("taken over");
        }
        if !interface_exists(guard.ifindex) {
            return Keep::Release("its veth is gone");
        }
        if !synced {
            return Keep::Pending;
        }
        if engine.endpoint_id(&guard.namespace, &guard.pod).is_some() {
            // The endpoint lifecycle attaches it (and so takes the guard over).
            return Keep::Pending;
        }
        let key = (guard.namespace.clone(), guard.pod.clone());
        if known_pods.contains_key(&key) {
            return Keep::Release("the pod is not one rayfence isolates");
        }
        let guarded = self
            .namespaces
            .as_ref()
            .is_some_and(|n| n.contains_key(&guard.namespace));
        if !guarded {
            return Keep::Release("its namespace is no longer guarded");
        }
        Keep::Pending
    }
}

enum Keep {
    Pending,
    Release(&'static str),
}

/// Whether the ifindex names a link in the agent's network namespace. A failed
/// query counts as present: never release on doubt.
fn interface_exists(ifindex: u32) -> bool {
    match Rtnl::in_current().and_then(|mut rtnl| rtnl.link(ifindex)) {
        Ok(link) => link.is_some(),
        Err(_) => true,
    }
}
