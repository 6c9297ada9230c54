//! Who answers an operator query: the reconcile loop, between turns, from the
//! engine and the datapath it owns. A [`Query`] arrives on the channel of
//! [`crate::operator::query`]; `/v1/status` is read off the endpoints, guards and
//! held RayClusters; `/v1/explain` is [`crate::operator::explain`]'s verdict on the
//! engine, corrected by where the datapath stands (a pod not hooked yet, guarded,
//! or held fail-closed). The answers are the wire types of
//! [`crate::operator::wire`].
//!
//! Must not: change anything, or take long (the loop answers between turns).
use std::collections::BTreeMap;

use rayfence_common::Verdict;

use super::{EndpointState, Runtime};
use crate::operator::explain::{ExplainError, combine, endpoint_labels, explain_flow};
use crate::operator::query::Query;
use crate::operator::wire::{
    EndpointStatus, ExplainQuery, ExplainReport, GuardedPod, HeldRayCluster, StatusReport,
};
use crate::tables::EndpointId;

impl Runtime {
    pub(super) fn answer(&self, query: Query) {
        match query {
            Query::Status(reply) => {
                let _ = reply.send(self.status_report());
            }
            Query::Explain(query, reply) => {
                let answer = explain_flow(&self.engine, &query.from, &query.to)
                    .map(|mut report| {
                        self.as_enforced(&mut report);
                        report
                    })
                    .or_else(|error| self.explain_guarded(&query, error));
                let _ = reply.send(answer);
            }
        }
    }

    /// What the engine says, corrected by where the datapath stands: a side whose
    /// pod has no hook yet is not enforced at all, one whose policy did not fit the
    /// maps drops everything (unless in audit mode).
    fn as_enforced(&self, report: &mut ExplainReport) {
        let mut changed = false;
        for side in &mut report.sides {
            let Some((namespace, pod)) = side.pod.as_deref().and_then(|p| p.split_once('/')) else {
                continue;
            };
            if let Some(guard) = self.guards.is_pending(namespace, pod) {
                side.verdict = "denied".into();
                side.because = guarded_because(namespace, pod, guard.waited_ms);
                side.rules.clear();
                changed = true;
                continue;
            }
            let Some(id) = self.engine.endpoint_id(namespace, pod) else {
                continue;
            };
            if let Some(((rc_namespace, rc), refusal)) = self.held_for(id)
                && side.verdict != "not-enforced"
            {
                side.verdict = "denied".into();
                side.because = format!(
                    "{namespace}/{pod} is fail-closed: RayCluster {rc_namespace}/{rc} does not fit the datapath's maps ({})",
                    refusal.describe()
                );
                side.rules.clear();
                changed = true;
            } else if self.datapath.fail_closed().contains(&id) && side.verdict != "not-enforced" {
                side.verdict = "denied".into();
                side.because = format!(
                    "{namespace}/{pod} is fail-closed: its policy did not fit the datapath's maps (see rayfence_map_entries)"
                );
                side.rules.clear();
                changed = true;
            } else if !matches!(
                self.endpoints.state(id),
                Some(EndpointState::Tc { .. } | EndpointState::Cgroup { .. })
            ) && side.verdict != "not-enforced"
            {
                side.verdict = "not-enforced".into();
                side.because = format!(
                    "{namespace}/{pod} has no hook attached (yet): nothing filters this side; the engine's verdict would be: {}",
                    side.because
                );
                changed = true;
            }
        }
        if changed {
            report.verdict = combine(&report.sides);
        }
    }

    /// A flow the engine cannot explain because an end is a pod it does not know
    /// yet, while the CNI guard holds that pod: denied on that side, and said so.
    fn explain_guarded(
        &self,
        query: &ExplainQuery,
        error: ExplainError,
    ) -> Result<ExplainReport, ExplainError> {
        if !matches!(
            error,
            ExplainError::UnknownPod { .. } | ExplainError::NoAddress { .. }
        ) {
            return Err(error);
        }
        let guarded = |end: &str| {
            let (namespace, pod) = end.split_once('/')?;
            let pod = pod.split([':', '/']).next().unwrap_or(pod);
            self.guards
                .is_pending(namespace, pod)
                .map(|g| (namespace.to_owned(), pod.to_owned(), g.waited_ms))
        };
        let (namespace, pod, waited_ms) = match (guarded(&query.from), guarded(&query.to)) {
            (Some(end), _) | (None, Some(end)) => end,
            (None, None) => return Err(error),
        };
        Err(ExplainError::Guarded {
            pod: format!("{namespace}/{pod}"),
            because: guarded_because(&namespace, &pod, waited_ms),
        })
    }

    /// The held RayCluster an endpoint belongs to, if it is held.
    fn held_for(
        &self,
        id: EndpointId,
    ) -> Option<(&super::capacity::Tenant, &super::capacity::Refusal)> {
        if !self.datapath.held().contains(&id) {
            return None;
        }
        let meta = self.engine.endpoint_meta(id)?;
        let cluster = meta.cluster?;
        self.held.get_key_value(&(meta.namespace, cluster))
    }

    fn status_report(&self) -> StatusReport {
        // (drops, would-drops) per endpoint, over every reason and direction.
        let mut denied: BTreeMap<EndpointId, (u64, u64)> = BTreeMap::new();
        if let Ok(counters) = self.datapath.counters() {
            for (key, value) in counters {
                let slot = denied.entry(key.endpoint_id).or_default();
                match Verdict::from_u8(key.verdict) {
                    Some(Verdict::Drop) => slot.0 += value.packets,
                    Some(Verdict::Audit) => slot.1 += value.packets,
                    _ => {}
                }
            }
        }
        let mut endpoints: Vec<EndpointStatus> = self
            .engine
            .endpoints()
            .map(|meta| {
                let (hook, state, detail) = match self.endpoints.state(meta.id) {
                    Some(EndpointState::Tc { interface, .. }) => {
                        ("tc", "attached", Some(interface.clone()))
                    }
                    Some(EndpointState::Cgroup { cgroup_id }) => (
                        "cgroup",
                        "attached",
                        Some(format!(
                            "cgroup id {cgroup_id}; the node's addresses are ordinary \
                             addresses here (only an ipBlock allows them)"
                        )),
                    ),
                    Some(EndpointState::NotEnforced { reason }) => {
                        ("none", "not-enforced", Some(reason.clone()))
                    }
                    _ if self.guards.is_pending(&meta.namespace, &meta.pod).is_some() => (
                        "tc",
                        "guarded",
                        Some(
                            "held by the CNI guard until programmed: only its node reaches it"
                                .into(),
                        ),
                    ),
                    Some(EndpointState::Pending { last_error, .. }) => {
                        ("none", "pending", Some(last_error.clone()))
                    }
                    None => ("none", "pending", None),
                };
                let mode = if self.datapath.fail_closed().contains(&meta.id)
                    || self.datapath.held().contains(&meta.id)
                {
                    "fail-closed"
                } else if meta.policy.audit {
                    "audit"
                } else {
                    "enforce"
                };
                let (raycluster, role) = endpoint_labels(&self.engine, meta.id);
                let (drops, would_drops) = denied.get(&meta.id).copied().unwrap_or_default();
                EndpointStatus {
                    namespace: meta.namespace.clone(),
                    pod: meta.pod.clone(),
                    raycluster,
                    role,
                    hook: hook.into(),
                    state: state.into(),
                    detail: detail.filter(|d| !d.is_empty()),
                    mode: mode.into(),
                    isolate_ingress: meta.policy.isolate_ingress,
                    isolate_egress: meta.policy.isolate_egress,
                    generation: self.datapath.generation(meta.id),
                    drops,
                    would_drops,
                }
            })
            .collect();
        endpoints.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
        StatusReport {
            guarded_namespaces: self
                .guards
                .namespaces()
                .map(|n| n.keys().cloned().collect())
                .unwrap_or_default(),
            guarded: self
                .guards
                .pending()
                .iter()
                .map(|g| GuardedPod {
                    namespace: g.namespace.clone(),
                    pod: g.pod.clone(),
                    ifindex: g.ifindex,
                    waited_ms: g.waited_ms,
                })
                .collect(),
            node: self.config.settings.node_name.clone(),
            version: concat!(
                env!("CARGO_PKG_VERSION"),
                " (",
                env!("RAYFENCE_COMMIT"),
                ")"
            )
            .to_owned(),
            ready: self.health.is_ready(),
            source: self.source_status.clone(),
            audit: self.config.settings.audit,
            problems: self.reported.len(),
            node_trust: self.datapath.node_trust().describe(),
            host_network_pods: self.host_network_pods.keys().cloned().collect(),
            held: self
                .held
                .iter()
                .map(|((namespace, name), refusal)| HeldRayCluster {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    map: refusal.map.to_owned(),
                    needed: refusal.needed,
                    free: refusal.free,
                })
                .collect(),
            endpoints,
        }
    }
}

fn guarded_because(namespace: &str, pod: &str, waited_ms: u64) -> String {
    format!(
        "{namespace}/{pod} is held by the CNI guard ({:.1}s so far): the agent has not \
         programmed it yet, so only its node reaches it and it reaches only its node",
        waited_ms as f64 / 1e3
    )
}
