//! The decision, the same for every hook, top to bottom: link control, fail-closed
//! (node traffic excepted, and a CNI guard's DNS), related ICMP errors, conntrack (with the generation
//! re-check that makes revocation work), then node traffic and policy for new
//! flows. An established packet costs the endpoint lookup, the parse and one
//! conntrack lookup, and no counter work; every drop is counted and sampled, every
//! allowed new flow counted.
//!
//! Revocation: a flow whose re-check fails keeps its (stale) entry. Each of its
//! packets, either way, is re-checked in the direction that opened it and dropped
//! (`revoked`) until a rule allows it again (the entry is refreshed) or the
//! conntrack LRU evicts the entry. Deleting it instead would let the side whose
//! direction is not isolated re-open the flow with its next packet. The one way
//! past a revoked entry is a new TCP connection the other way on the same tuple (a
//! SYN without ACK), decided as a new flow of its own direction ([`reopen`]).
//! UDP, ICMP and the rest carry no such signal: a revoked tuple stays cut both ways
//! until the entry is evicted or allowed again.
//!
//! Audit: a flow that no rule allows passes on an audit endpoint, counted and
//! sampled once, and gets a conntrack entry marked [`ct_flags::AUDITED`] (so its
//! replies are not opened as a flow of their own direction). Switching the endpoint
//! to enforce bumps its generation: the entry is re-checked on its next packet,
//! found not allowed, and dropped from then on in both directions, as a revoked
//! flow is.
//!
//! The BPF stack is 512 bytes for the whole call chain, so the bulky steps are
//! separate (non-inlined) functions that take pointers, not copies.
use rayfence_common::{
    Addr, CtKey, CtValue, Direction, EndpointInfo, Reason, Verdict, ct_flags, endpoint_flags,
    identity,
};

use crate::kernel::{
    conntrack, identity as ident, ipfrag, maps, metrics,
    node::{self, NodePeer},
    parse::{self, Class, Flow, IPPROTO_TCP, IPPROTO_UDP, Layer, Packet, Skb, tcp_flags},
    policy,
};

#[inline(always)]
const fn isolates(flags: u32, direction: Direction) -> bool {
    let bit = match direction {
        Direction::Ingress => endpoint_flags::ISOLATE_INGRESS,
        Direction::Egress => endpoint_flags::ISOLATE_EGRESS,
    };
    flags & (bit | endpoint_flags::FAIL_CLOSED) != 0
}

/// The packet being decided: what every step needs (BPF calls take at most five
/// arguments, so the steps take this by reference).
struct Current<'a> {
    skb: Skb,
    layer: Layer,
    endpoint: &'a EndpointInfo,
    /// The direction this packet travels.
    direction: Direction,
}

/// What a decision off the established fast path needs besides the key.
struct NewFlow {
    /// The destination port of this packet.
    dst_port: u16,
    /// ICMP errors never open a flow.
    may_open: bool,
    /// [`Packet::l4_offset`], for the TCP flags of a packet on a revoked flow.
    l4_offset: u32,
}

/// `true` to pass the packet.
#[inline(always)]
pub fn decide(skb: Skb, layer: Layer, endpoint: &EndpointInfo, direction: Direction) -> bool {
    let flags = endpoint.flags;
    if flags
        & (endpoint_flags::ISOLATE_INGRESS
            | endpoint_flags::ISOLATE_EGRESS
            | endpoint_flags::FAIL_CLOSED)
        == 0
    {
        return true;
    }
    let enforced = isolates(flags, direction);
    let this = Current {
        skb,
        layer,
        endpoint,
        direction,
    };
    let mut packet = Packet::default();
    match parse::parse(skb, layer, &mut packet) {
        Ok(()) => {}
        Err(Reason::LinkControl) => return true,
        Err(reason) if enforced => return deny_unparsed(skb, endpoint, direction, reason),
        Err(_) => return true,
    }
    if flags & endpoint_flags::FAIL_CLOSED != 0 {
        return fail_closed(&this, &packet.flow);
    }
    let mut new_flow = NewFlow {
        dst_port: 0,
        may_open: true,
        l4_offset: packet.l4_offset,
    };
    match packet.class {
        Class::Plain => {}
        Class::IcmpError => {
            // The quoted packet travelled the other way.
            let related = conntrack::key(endpoint.endpoint_id, opposite(direction), &packet.inner);
            if is_related(&this, &related) {
                return true;
            }
            new_flow.may_open = false;
        }
        Class::LaterFragment => {
            let id = packet.fragment_id;
            if !ipfrag::fill_ports(endpoint.endpoint_id, id, &mut packet.flow) && enforced {
                return deny_flow(
                    skb,
                    endpoint,
                    direction,
                    &packet.flow,
                    Reason::FragmentUnknown,
                );
            }
        }
    }
    new_flow.dst_port = packet.flow.dst_port;
    let key = conntrack::key(endpoint.endpoint_id, direction, &packet.flow);
    let pass = decide_flow(&this, &key, &new_flow);
    if pass && packet.is_first_fragment {
        ipfrag::remember(endpoint.endpoint_id, packet.fragment_id, &packet.flow);
    }
    pass
}

#[inline(never)]
fn decide_flow(this: &Current, key: &CtKey, new_flow: &NewFlow) -> bool {
    let (skb, layer, endpoint, direction) = (this.skb, this.layer, this.endpoint, this.direction);
    if let Some(entry) = conntrack::lookup(key) {
        // SAFETY: a live LRU value; a concurrent eviction leaves it readable.
        let (generation, origin, ct) =
            unsafe { ((*entry).generation, (*entry).origin, (*entry).flags) };
        if generation == endpoint.generation {
            return true;
        }
        let origin = Direction::from_u8(origin).unwrap_or(direction);
        if recheck(this, key, origin, ct) {
            // Allowed now, whether or not it was before.
            // SAFETY: as above.
            unsafe {
                (*entry).generation = endpoint.generation;
                (*entry).flags = ct & !(ct_flags::AUDITED | ct_flags::REOPENING);
            }
            return true;
        }
        // A flow that passed only by audit was never allowed: no policy, not revoked.
        let audited = ct & ct_flags::AUDITED != 0;
        let reason = if audited {
            Reason::NoPolicy
        } else {
            Reason::Revoked
        };
        if endpoint.flags & endpoint_flags::AUDIT != 0 {
            // Passes by audit from now on: counted once per re-check, not per packet.
            // SAFETY: as above.
            unsafe {
                (*entry).generation = endpoint.generation;
                (*entry).flags = (ct | ct_flags::AUDITED) & !ct_flags::REOPENING;
            }
            return deny(skb, endpoint, direction, key, reason);
        }
        // Enforced: the stale entry stays (never deleted here), so each packet of the
        // flow, either way, comes back to this re-check and is dropped; the pod's own
        // next packet cannot re-open it as a flow of the other direction (which
        // DenyAllIngress, say, would let through), nor the peer's with DenyAllEgress.
        if key.protocol == IPPROTO_TCP {
            let tcp = parse::tcp_flags_at(skb, new_flow.l4_offset);
            let handshake =
                tcp & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST | tcp_flags::FIN);
            if direction != origin && handshake == tcp_flags::SYN {
                // Decided here, not in `reopen`: one call level less on the stack.
                let allowed = recheck(this, key, direction, 0);
                return reopen(this, key, entry, allowed);
            }
            if ct & ct_flags::REOPENING != 0
                && direction == origin
                && handshake == tcp_flags::SYN | tcp_flags::ACK
                && recheck(this, key, opposite(origin), 0)
            {
                // The pod accepts the peer's new connection: only a kernel without a
                // connection on this tuple answers a SYN with a SYN-ACK. The entry
                // becomes the new flow's (the new flow was counted at its SYN).
                conntrack::create(key, endpoint.generation, opposite(origin), 0);
                return true;
            }
        }
        return deny(skb, endpoint, direction, key, reason);
    }
    // A new flow.
    if !isolates(endpoint.flags, direction) {
        // Open the flow so that its replies pass the isolated other direction.
        if new_flow.may_open {
            conntrack::create(key, endpoint.generation, direction, 0);
            count_new(skb, endpoint, direction, Reason::NotIsolated);
        }
        return true;
    }
    let NodePeer::Peer {
        exact,
        addr,
        by_address,
    } = peer(skb, layer, key, direction, direction)
    else {
        // The node itself always passes; its entry keeps that answer for re-checks.
        if new_flow.may_open {
            conntrack::create(key, endpoint.generation, direction, ct_flags::NODE);
        }
        return true;
    };
    if policy::allows(
        endpoint.policy_id,
        direction,
        exact,
        by_address.then_some(&addr),
        key.protocol,
        new_flow.dst_port,
    ) {
        if new_flow.may_open {
            conntrack::create(key, endpoint.generation, direction, 0);
        }
        count_new(skb, endpoint, direction, Reason::PolicyAllow);
        return true;
    }
    if endpoint.flags & endpoint_flags::AUDIT != 0 && new_flow.may_open {
        conntrack::create(key, endpoint.generation, direction, ct_flags::AUDITED);
    }
    deny_peer(this, key, &addr)
}

/// Only the node itself (its host processes: kubelet probes) passes a fail-closed
/// endpoint. No conntrack here, so each packet asks; fail-closed is transient. A
/// CNI guard (`GUARD`) also passes its pod's DNS queries and their replies.
#[inline(never)]
fn fail_closed(this: &Current, flow: &Flow) -> bool {
    let key = conntrack::key(this.endpoint.endpoint_id, this.direction, flow);
    if let NodePeer::Node = peer(this.skb, this.layer, &key, this.direction, this.direction) {
        return true;
    }
    if this.endpoint.flags & endpoint_flags::GUARD != 0 && guard_dns(this, &key) {
        return true;
    }
    deny(
        this.skb,
        this.endpoint,
        this.direction,
        &key,
        Reason::FailClosed,
    )
}

/// A guarded pod's DNS: a query (UDP or TCP to port 53 of an `RF_GUARDDNS` address,
/// or of any address when the map holds the all-zero key) opens a conntrack entry
/// under the guard's endpoint id; a packet towards the pod passes only on such an
/// entry. Two map lookups at most.
#[inline(never)]
fn guard_dns(this: &Current, key: &CtKey) -> bool {
    match this.direction {
        Direction::Egress => {
            if key.peer_port != 53 || (key.protocol != IPPROTO_TCP && key.protocol != IPPROTO_UDP) {
                return false;
            }
            // SAFETY: plain data, only checked for presence.
            let listed = unsafe {
                maps::GUARD_DNS.get(&key.peer).is_some()
                    || maps::GUARD_DNS
                        .get(&rayfence_common::GUARD_DNS_ANY)
                        .is_some()
            };
            if listed {
                conntrack::create(key, this.endpoint.generation, Direction::Egress, 0);
            }
            listed
        }
        Direction::Ingress => match conntrack::lookup(key) {
            Some(entry) => {
                // SAFETY: a live LRU value; a concurrent eviction leaves it readable.
                let origin = unsafe { (*entry).origin };
                origin == Direction::Egress as u8
            }
            None => false,
        },
    }
}

/// Denies a new flow as `no-policy`; the event names who is behind a node address
/// (a NATed flow's client) as the peer.
#[inline(never)]
fn deny_peer(this: &Current, key: &CtKey, peer: &Addr) -> bool {
    let mut shown = *key;
    shown.peer = *peer;
    deny(
        this.skb,
        this.endpoint,
        this.direction,
        &shown,
        Reason::NoPolicy,
    )
}

/// Who the peer of `key` is for a flow opened in `origin` (the current packet
/// travels in `direction`): an ordinary peer by its identities, or, behind one of
/// the node's own addresses, whatever [`node::classify`] finds.
#[inline(always)]
fn peer(skb: Skb, layer: Layer, key: &CtKey, origin: Direction, direction: Direction) -> NodePeer {
    match ident::exact(&key.peer) {
        // The cgroup hook, in the pod's namespace, cannot see who it is: only its
        // node ports (compiled, not seen) are still decided on their backends.
        Some(identity::HOST) if layer == Layer::L3 => match origin {
            Direction::Egress => node::node_port(key).unwrap_or(NodePeer::address(key.peer)),
            Direction::Ingress => NodePeer::address(key.peer),
        },
        Some(identity::HOST) => node::classify(skb, key, origin, direction),
        exact => NodePeer::Peer {
            exact: exact.unwrap_or(identity::NONE),
            addr: key.peer,
            by_address: true,
        },
    }
}

/// A TCP SYN without ACK the other way of a revoked (enforced) flow: a new
/// connection on the same tuple, decided as a new flow of its own direction.
///
/// - Sent by the pod: its kernel sends a bare SYN only for a connection it does not
///   have, so an allowed SYN replaces the revoked entry at once.
/// - Sent by the peer: anyone can send a SYN, and a pod whose connection is still
///   established answers it with a (challenge) ACK, which would then pass as a
///   reply and resume the revoked connection. So an allowed SYN passes, and marks
///   the entry [`ct_flags::REOPENING`]; the entry stays the revoked flow's, and
///   everything but the peer's SYNs stays dropped, until the pod answers SYN-ACK.
///
/// A SYN that is not allowed (`allowed`: the caller's re-check of it as a new flow
/// of its own direction) is dropped as `no-policy`, and the entry stays.
#[inline(never)]
fn reopen(this: &Current, key: &CtKey, entry: *mut CtValue, allowed: bool) -> bool {
    let (skb, endpoint, direction) = (this.skb, this.endpoint, this.direction);
    if !allowed {
        return deny(skb, endpoint, direction, key, Reason::NoPolicy);
    }
    let reason = if isolates(endpoint.flags, direction) {
        Reason::PolicyAllow
    } else {
        Reason::NotIsolated
    };
    match direction {
        Direction::Egress => conntrack::create(key, endpoint.generation, direction, 0),
        Direction::Ingress => {
            // SAFETY: a live LRU value (see decide_flow).
            let ct = unsafe { (*entry).flags };
            if ct & ct_flags::REOPENING != 0 {
                // A retransmitted SYN: the new flow is counted already.
                return true;
            }
            // SAFETY: as above.
            unsafe { (*entry).flags = ct | ct_flags::REOPENING };
        }
    }
    count_new(skb, endpoint, direction, reason);
    true
}

/// A flow opened in direction `origin` on `key`: is it allowed under the current
/// tables? (The re-check of a flow decided under older tables, and the decision on
/// a new connection over a revoked entry.) `ct` is the flow's entry flags: a flow
/// the node opened (found by its socket at the first packet) stays the node's
/// while its address is; a flow to the node is asked again (its port may have
/// become a node port).
#[inline(never)]
fn recheck(this: &Current, key: &CtKey, origin: Direction, ct: u8) -> bool {
    let endpoint = this.endpoint;
    if !isolates(endpoint.flags, origin) {
        return true;
    }
    let NodePeer::Peer {
        exact,
        addr,
        by_address,
    } = (if ct & ct_flags::NODE != 0
        && origin == Direction::Ingress
        && ident::exact(&key.peer) == Some(identity::HOST)
    {
        NodePeer::Node
    } else {
        peer(this.skb, this.layer, key, origin, this.direction)
    })
    else {
        return true;
    };
    // The packet that opened the flow went to the peer's port (egress) or to ours.
    let port = match origin {
        Direction::Egress => key.peer_port,
        Direction::Ingress => key.local_port,
    };
    policy::allows(
        endpoint.policy_id,
        origin,
        exact,
        by_address.then_some(&addr),
        key.protocol,
        port,
    )
}

/// Whether an ICMP error quoting the flow `key` is about a flow that passes: its
/// entry is current, or stale and the flow still allowed. A revoked flow keeps its
/// entry, but errors about it are not related; they are decided as ICMP packets.
#[inline(never)]
fn is_related(this: &Current, key: &CtKey) -> bool {
    let endpoint = this.endpoint;
    let Some(entry) = conntrack::lookup(key) else {
        return false;
    };
    // SAFETY: a live LRU value; a concurrent eviction leaves it readable.
    let (generation, origin, ct) =
        unsafe { ((*entry).generation, (*entry).origin, (*entry).flags) };
    if generation == endpoint.generation {
        return true;
    }
    match Direction::from_u8(origin) {
        Some(origin) => recheck(this, key, origin, ct),
        None => false,
    }
}

#[inline(always)]
const fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    }
}

#[inline(always)]
fn count_new(skb: Skb, endpoint: &EndpointInfo, direction: Direction, reason: Reason) {
    metrics::count(
        endpoint.endpoint_id,
        direction,
        Verdict::Allow,
        reason,
        skb.len(),
    );
}

/// Drops (or, in audit mode, passes) with `reason`; counts and samples it. Not
/// inlined: the drop path is cold and its event copy would crowd the stack.
#[inline(never)]
fn deny(
    skb: Skb,
    endpoint: &EndpointInfo,
    direction: Direction,
    key: &CtKey,
    reason: Reason,
) -> bool {
    let audit = endpoint.flags & endpoint_flags::AUDIT != 0;
    let verdict = if audit { Verdict::Audit } else { Verdict::Drop };
    let bytes = skb.len();
    metrics::count(endpoint.endpoint_id, direction, verdict, reason, bytes);
    metrics::event(key, direction, verdict, reason, bytes);
    audit
}

#[inline(never)]
fn deny_flow(
    skb: Skb,
    endpoint: &EndpointInfo,
    direction: Direction,
    flow: &Flow,
    reason: Reason,
) -> bool {
    let key = conntrack::key(endpoint.endpoint_id, direction, flow);
    deny(skb, endpoint, direction, &key, reason)
}

#[inline(never)]
fn deny_unparsed(skb: Skb, endpoint: &EndpointInfo, direction: Direction, reason: Reason) -> bool {
    let key = CtKey {
        endpoint_id: endpoint.endpoint_id,
        ..CtKey::default()
    };
    deny(skb, endpoint, direction, &key, reason)
}
