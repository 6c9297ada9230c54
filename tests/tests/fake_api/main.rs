//! Real kube-rs clients against the kit's fake Kubernetes API server over HTTP, no
//! privilege needed: the server's REST and watch paths, and the agent's Kubernetes
//! source and Event reporter on top of them.

mod kube_source;
mod rest;
mod watch;
