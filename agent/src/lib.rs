//! nodeward: the node agent and its CLI.
pub mod api;
pub mod app;
pub mod ca;
pub mod cli;
pub mod datapath;
pub mod endpoints;
pub mod flows;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod source;
