//! deploy/ against the running agent, root only (it loads the datapath): the
//! ClusterRoles grant exactly what the agent does and its scrapers need, and the
//! DaemonSets' capabilities are enough and each needed. Rendering comes from the
//! kit (`rayfence_tests::deploy`).

mod capabilities;
mod rbac;
