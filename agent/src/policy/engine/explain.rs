//! `explain`: why a flow of a local pod gets its verdict, from the same rows and
//! identities the tables hold.
//!
//! Must not: change state, or reach a verdict the tables would not.

use std::net::IpAddr;

use super::{Engine, Explanation};
use crate::tables::{Direction, EndpointId, identity};

impl Engine {
    /// Explains the verdict [`Tables::allows`] gives a new flow of a local pod.
    pub fn explain(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        peer: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Explanation {
        let Some(ep) = self.out.tables.endpoints.get(&endpoint) else {
            return Explanation::UnknownEndpoint;
        };
        let isolated = match direction {
            Direction::Ingress => ep.isolate_ingress,
            Direction::Egress => ep.isolate_egress,
        };
        if !isolated {
            return Explanation::NotIsolated;
        }
        let exact = self.out.tables.addresses.get(&peer).copied();
        if exact == Some(identity::HOST) {
            return Explanation::Host;
        }
        if let Some(service) = self.cluster_ips.get(&peer) {
            if direction == Direction::Ingress {
                return Explanation::Denied;
            }
            let Some(svc) = self.services.get(service) else {
                return Explanation::Denied;
            };
            let allowed = self.policies.get(&ep.policy_id).is_some_and(|p| {
                p.rows.get(&svc.identity).is_some_and(|rows| {
                    rows.iter()
                        .any(|r| r.direction == direction && r.matches(protocol, port))
                })
            });
            if !allowed {
                return Explanation::Denied;
            }
            let mut rules = Vec::new();
            for sp in svc
                .ports
                .iter()
                .filter(|p| p.protocol == protocol && p.port == port)
            {
                for (ip, proto, target) in self.backends(service, sp) {
                    if let Explanation::Allowed(r) =
                        self.explain(endpoint, direction, ip, proto, target)
                    {
                        rules.extend(r);
                    }
                }
            }
            rules.sort();
            rules.dedup();
            return Explanation::AllowedViaService {
                service: service.clone(),
                rules,
            };
        }
        let cidr = self.longest_prefix(peer);
        let mut rules = Vec::new();
        for id in [exact, cidr].into_iter().flatten() {
            for (origin, object, rows) in self.rule_rows(ep.policy_id, id) {
                if rows
                    .iter()
                    .any(|r| r.direction == direction && r.matches(protocol, port))
                {
                    rules.push(((*object).clone(), origin));
                }
            }
        }
        rules.sort();
        rules.dedup();
        if rules.is_empty() {
            Explanation::Denied
        } else {
            Explanation::Allowed(rules)
        }
    }
}
