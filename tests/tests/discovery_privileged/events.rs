//! Link events from the host (node) namespace: a pod veth created by "the CNI"
//! is reported as added within milliseconds, a change to a link that already
//! existed is not mistaken for a new one, and a deleted veth is reported removed.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rayfence::discovery::{LinkEvent, LinkWatcher};
use rayfence_tests::{Layout, Netns, Topology, probe_bin};

/// Waits for the first event about interface `name` that `want` accepts.
fn wait_for(
    watcher: &mut LinkWatcher,
    name: &str,
    want: impl Fn(&LinkEvent) -> bool,
    timeout: Duration,
) -> Result<Option<LinkEvent>> {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match watcher.next_event(left)? {
            Some(e) if e.link().name == name && want(&e) => return Ok(Some(e)),
            Some(_) => continue,
            None => break,
        }
    }
    Ok(None)
}

#[test]
fn a_new_pod_veth_is_reported_added_within_milliseconds_then_removed() -> Result<()> {
    let topo = Topology::new(Layout::Routed, probe_bin())?;
    let node = topo.node(0);
    let pod_ns = Netns::new("pod-late")?;
    let mut watcher = LinkWatcher::new(Some(&node.netns.path()))?;
    let host_if = format!("rf{}late", topo.tag());

    // A reader blocked in next_event timestamps the event as it arrives; the
    // latency measured includes spawning `ip`, so it is an upper bound.
    let (tx, rx) = mpsc::channel();
    let name = host_if.clone();
    let reader = std::thread::spawn(move || -> Result<LinkWatcher> {
        let added = wait_for(
            &mut watcher,
            &name,
            |e| matches!(e, LinkEvent::Added(_)),
            Duration::from_secs(5),
        )?;
        let _ = tx.send((added, Instant::now()));
        Ok(watcher)
    });
    let t0 = Instant::now();
    node.netns.ip(&[
        "link",
        "add",
        &host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod_ns.name(),
    ])?;
    let (added, at) = rx.recv_timeout(Duration::from_secs(6))?;
    let mut watcher = reader.join().expect("reader thread")?;
    let added = added.expect("an Added event for the new veth");
    let latency = at.duration_since(t0);
    println!("link event: veth {host_if} reported {latency:?} after `ip link add` started");
    assert!(latency < Duration::from_millis(500), "{latency:?}");
    let link = added.link();
    assert_eq!(link.ifindex, node.netns.ifindex(&host_if)?);
    assert!(link.is_veth(), "{link:?}");
    assert!(
        link.link_netnsid.is_some(),
        "the peer is in the pod namespace: {link:?}"
    );

    // A link that existed before the watcher started is only ever Changed.
    node.netns.ip(&["link", "set", "host0", "mtu", "1400"])?;
    let changed = wait_for(&mut watcher, "host0", |_| true, Duration::from_secs(2))?;
    assert!(
        matches!(changed, Some(LinkEvent::Changed(_))),
        "{changed:?}"
    );

    node.netns.ip(&["link", "del", &host_if])?;
    let removed = wait_for(
        &mut watcher,
        &host_if,
        |e| matches!(e, LinkEvent::Removed(_)),
        Duration::from_secs(2),
    )?;
    assert_eq!(removed.map(|e| e.link().ifindex), Some(link.ifindex));
    Ok(())
}

#[test]
fn no_event_means_next_event_returns_none_at_the_timeout() -> Result<()> {
    let topo = Topology::new(Layout::Bridged, probe_bin())?;
    let mut watcher = LinkWatcher::new(Some(&topo.node(0).netns.path()))?;
    let t0 = Instant::now();
    assert_eq!(watcher.next_event(Duration::from_millis(100))?, None);
    assert!(t0.elapsed() >= Duration::from_millis(90));
    Ok(())
}
